"""recog's "what is this photo?" served by LitServe, for bench/serve_peers.py: the same export (embedder.pt2),
the same faiss index, the same decode and the same answer as `python -m recog.serve`, set up as LitServe's
documentation recommends.

    .venv/bin/python bench/serve_litserve.py --model EXPORT_DIR --index INDEX_DIR --port 8001

POST /identify {"image": base64 of the encoded image, "k": 5} -> recog.serve's answer ({"vote", "matches", "batch",
"model_sha256", ...}). LitServe's request handler reads JSON or a form, not a raw body: a JSON body with the image
in base64 is how its image examples take one.

The setup (LitServe 0.2.19's documentation):
- a LitAPI: setup loads the export and the index once per worker; decode_request decodes the image with
  recog.serve's own decode_upload (header checked first, then Pillow, then the export's resize and crop);
  batch stacks the images; predict embeds and searches the batch; unbatch splits it; encode_response builds
  recog.identify's answer;
- its batching: max_batch_size (32, recog.serve's --max-batch) and batch_timeout (--batch-timeout-s);
- workers_per_device: "for CPU, set to the number of cores" (LitServer's docstring): os.cpu_count();
- accelerator="cpu"; num_api_servers left to LitServe (one per inference worker); fast_queue (ZeroMQ) for "more
  than 100 requests/s" (its docstring), as here;
- logging at warning, no client file written, no OpenAPI page.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

from fastapi import HTTPException

ROOT = Path(__file__).resolve().parents[1]


import litserve as ls  # noqa: E402 - after the docstring's imports: this program needs it
import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
from recog.exported import ExportedEmbedder  # noqa: E402
from recog.gallery import open_gallery  # noqa: E402
from recog.identify import answer, check_match, gallery_class_names  # noqa: E402
from recog.serve import BadRequest, decode_upload  # noqa: E402


class IdentifyAPI(ls.LitAPI):
    """recog.serve's POST /identify as a LitAPI (module level: LitServe's spawned workers unpickle it)."""

    def __init__(self, model_dir: str, index_dir: str, max_batch: int, batch_timeout_s: float):
        super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout_s, api_path="/identify")
        self.model_dir, self.index_dir = model_dir, index_dir

    def setup(self, device):
        self.embedder = ExportedEmbedder(self.model_dir, device)  # LitServe's device: "cpu", or "cuda:N" per worker
        self.gallery = open_gallery(self.index_dir)
        check_match(self.embedder, self.gallery, self.model_dir, self.index_dir)
        self.classes = gallery_class_names(self.embedder, self.gallery)
        self.names = {"model_sha256": self.embedder.sha256, "index_generation": self.gallery.info.generation}
        blank = torch.zeros((1, self.embedder.channels, self.embedder.size, self.embedder.size), dtype=torch.uint8)
        self.gallery.search(self.embedder.embed(blank), 1)  # warm, as recog.serve's Pair does

    def decode_request(self, request):
        try:
            data = base64.b64decode(request["image"])
        except (KeyError, TypeError, ValueError):
            raise HTTPException(400, 'send {"image": base64 of the image file}.') from None
        try:
            pixels = decode_upload(data, self.embedder.channels, self.embedder.preprocess, 1 << 28)
        except BadRequest as e:
            raise HTTPException(e.status, e.message) from None
        return pixels, int(request.get("k", 5))

    def batch(self, inputs):
        return torch.stack([pixels for pixels, _ in inputs]), [k for _, k in inputs]

    def predict(self, x):
        pixels, ks = x
        scores, ids = self.gallery.search(self.embedder.embed(pixels), max(ks))
        return [(scores[i, :k], ids[i, :k], len(ks)) for i, k in enumerate(ks)]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        scores, ids, size = output
        return {**answer(self.gallery, self.classes, scores, ids), "batch": size, **self.names}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-timeout-s", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers_per_device (default: cores)")
    p.add_argument("--accelerator", default="cpu", help="LitServer's accelerator: cpu or cuda")
    p.add_argument("--no-fast-queue", action="store_true", help="LitServe's multiprocessing queues, not ZeroMQ")
    args = p.parse_args()
    api = IdentifyAPI(str(Path(args.model).resolve()), str(Path(args.index).resolve()), args.max_batch,
                      args.batch_timeout_s)
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=args.workers,
                          fast_queue=not args.no_fast_queue, disable_openapi_url=True)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
