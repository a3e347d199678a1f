"""The identify side: recog.embed's loop against a bare loop, and faiss index kinds on a large synthetic gallery.

    python bench/identify.py                      # both parts: embedding, then 1,000,000 vectors
    python bench/identify.py --skip-index         # the embedding loop only
    python bench/identify.py --vectors 200000 --kinds flat,ivfpq

Embedding: the real `recog.embed.embed_batches` (bookkeeping per batch, each part written by a thread: float16
or float32 conversion, two files, fsyncs) against a bare loop calling the same model on the same batches, held in
memory, so that neither waits for data. Rounds alternate which loop goes first (this machine is shared and noisy:
side by side, drift hits both alike). Prints images/s of each and the ratio recog / bare (target >= 0.95). The
model is the default convnet with random weights (speed does not depend on them), or --model (an export or a
checkpoint); the images are the bundled Fashion-MNIST training shards.

Index: --vectors synthetic 128-d unit vectors near 100 cluster centres, each cluster over its own 8-dimensional
subspace (like a trained model's embeddings; isotropic noise would be a worst case no real gallery is), written
once as an embeddings folder. For each kind, in its own process (so that its peak memory is its own): the build
time with `recog.index.build` (training on a sample, adding chunk by chunk), the peak resident memory of that
process, the search latency p50/p99 with 1 and with 64 queries per call, and recall@10 against the exact (flat)
neighbours of 1,000 held-out queries, two ways: 10-recall@10 (the share of the exact top 10 found) and faiss's
R@10 (the share of queries whose exact nearest neighbour is among the 10 returned). Peak memory includes the
gallery chunks read while adding and the index opened again for searching.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import medians, require, rounds, timed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUERIES = 1000


def train_config(*overrides: str):
    """The train config of conf/, composed as train.py composes it (resolved when read)."""

    from recog.rundir import compose_train_config

    return compose_train_config(*overrides)


def random_checkpoint(path: Path) -> Path:
    """The default train config's model with random weights, saved as train.py saves a checkpoint."""
    from omegaconf import OmegaConf

    from recog.checkpoint import save_checkpoint
    from recog.model import RecognitionModel

    cfg = OmegaConf.to_container(train_config("data.channels=1", "data.image_size=28", "data.mean=[0.286]",
                                              "data.std=[0.353]"), resolve=True)
    spec = {k: v for k, v in cfg["model"].items() if k != "_target_"}
    torch.manual_seed(0)
    model = RecognitionModel(num_classes=10, in_channels=1, **spec)
    save_checkpoint({"model": model.state_dict(), "config": cfg, "epoch": 1, "step": 1}, path)
    return path


def bench_embedding(model_path: str | None, count: int, batch_size: int) -> None:
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from recog import dist
    from recog.data.prepare import prepare_shards
    from recog.embed import RankParts, embed_batches, open_inputs
    from recog.preempt import StopOnSignal

    with tempfile.TemporaryDirectory(prefix="recog-bench-") as tmp:
        tmp = Path(tmp)
        shards = ROOT / "data" / "shards" / "fashion-mnist-small"
        if not (shards / "train" / "manifest.json").is_file():
            prepare_shards(train_config().data, progress=True)
        cfg = OmegaConf.create({"model": model_path or str(random_checkpoint(tmp / "model.pt")),
                                "data": str(shards / "train"), "out": str(tmp / "out"), "batch_size": batch_size,
                                "num_workers": 0, "dtype": "float16", "strict": False, "part_size": 2000})
        ctx = dist.Dist(0, 0, 1, 1, torch.device("cpu"), None)
        work = open_inputs(cfg, ctx)
        batches = list(work.stream)  # decoded and resized once, kept in memory: both loops get the same batches
        images = sum(len(b.keys) for b in batches)
        model = work.model
        print(f"embedding: {images} images of {cfg.data}, batches of {batch_size}, model {cfg.model}, "
              f"{torch.get_num_threads()} thread(s)", flush=True)

        def bare() -> None:
            with torch.inference_mode():
                for batch in batches:
                    model(batch.images)

        def recog_loop() -> None:
            out = tmp / "out"
            out.mkdir(exist_ok=True)
            parts = RankParts(out, 0, work)
            embed_batches(model, batches, parts, ctx.device, StopOnSignal(), tqdm(disable=True))
            parts.finish()
            for f in out.iterdir():  # the next round writes them again (files of this benchmark's own folder)
                f.unlink()

        def rate(loop) -> float:
            return images / timed(loop)[1]

        bare(), recog_loop()  # warm-up: allocator, thread pools
        figures = medians(rounds({"bare": lambda _: rate(bare), "recog": lambda _: rate(recog_loop)}, count))
        print(f"| loop | images/s (median of {count}) |\n|---|---:|\n| bare model calls | {figures['bare']:.0f} |\n"
              f"| recog.embed's loop (parts written) | {figures['recog']:.0f} |\n\nrecog / bare: "
              f"{figures['recog'] / figures['bare']:.3f} (target >= 0.95)\n", flush=True)


def synthetic(count: int, first: int = 0, dim: int = 128, clusters: int = 100, rank: int = 8, seed: int = 0,
              chunk: int = 100_000):
    """Vectors first .. first + count - 1 of one distribution, a chunk at a time: unit vectors near `clusters`
    centres, each cluster spread over its own `rank`-dimensional subspace (the centres and subspaces come from
    `seed`; each chunk's draws from its position)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    bases = rng.standard_normal((clusters, rank, dim)).astype(np.float32) * (0.7 / np.sqrt(rank))
    for start in range(first, first + count, chunk):
        n = min(chunk, first + count - start)
        part = np.random.default_rng([seed, start])
        which = part.integers(0, clusters, n)
        x = centres[which] + np.einsum("kr,krd->kd", part.standard_normal((n, rank)).astype(np.float32),
                                       bases[which])
        x += 0.02 * part.standard_normal((n, dim)).astype(np.float32)
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), which


def write_gallery(folder: Path, count: int, model_sha256: str = "b" * 64) -> np.ndarray:
    """The gallery as an embeddings folder (parts of 100,000), labelled as embeddings of the model whose checkpoint
    has `model_sha256`, and QUERIES held-out queries."""
    from recog.embeddings import part_name, write_manifest, write_part

    folder.mkdir(parents=True)
    parts, start = [], 0
    for number, (vectors, labels) in enumerate(synthetic(count)):
        keys = [f"k{i}" for i in range(start, start + len(vectors))]
        parts.append(write_part(folder, part_name(number), vectors, keys, labels % 10))
        start += len(vectors)
    write_manifest(folder, model_sha256, 128, "float32", parts, [f"class{i}" for i in range(10)])
    return next(synthetic(QUERIES, first=count))[0]  # held out: drawn like the gallery, not in it


def index_worker(kind: str, gallery: Path, work: Path) -> dict:
    """One kind, in this process: build, search, and what it cost."""
    from recog.gallery import open_gallery
    from recog.index import build

    queries = np.load(work / "queries.npy")
    start = time.perf_counter()
    build(gallery, work / kind, kind=kind, log=lambda line: print(f"  {line}", flush=True))
    built = time.perf_counter() - start
    index = open_gallery(work / kind)
    index.search(queries[:64], 10)  # warm-up
    latency = {}
    for per_call, calls in ((1, 300), (64, 30)):
        times = []
        for i in range(calls):
            batch = queries[(i * per_call) % QUERIES:][:per_call]
            t = time.perf_counter()
            index.search(batch, 10)
            times.append((time.perf_counter() - t) * 1000)
        latency[per_call] = (np.percentile(times, 50), np.percentile(times, 99))
    _, ids = index.search(queries, 10)
    if kind == "flat":
        np.save(work / "exact.npy", ids)
    exact = np.load(work / "exact.npy")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])  # 10-recall@10: the top-10 found
    nearest = np.mean([b[0] in a for a, b in zip(ids, exact)])  # faiss's R@10: the nearest among the 10 returned
    size = sum(f.stat().st_size for f in (work / kind).iterdir())
    return {"kind": kind, "build_s": built, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "files_mb": size / 2**20, "p50_1": latency[1][0], "p99_1": latency[1][1], "p50_64": latency[64][0],
            "p99_64": latency[64][1], "recall@10": recall, "R@10": nearest}


def bench_index(count: int, kinds: list[str]) -> None:
    require("faiss", extra="identify")
    with tempfile.TemporaryDirectory(prefix="recog-bench-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        np.save(work / "queries.npy", write_gallery(work / "gallery", count))
        print(f"index: {count:,} synthetic 128-d vectors written in {time.perf_counter() - start:.0f} s; "
              f"{QUERIES} held-out queries, k=10", flush=True)
        if "flat" not in kinds:
            kinds = ["flat", *kinds]  # the exact neighbours every other kind is measured against
        rows = []
        for kind in kinds:
            result = subprocess.run([sys.executable, __file__, "--index-worker", kind, str(work / "gallery"),
                                     str(work)], stdout=subprocess.PIPE, text=True)
            if result.returncode != 0:
                raise SystemExit(f"error: the {kind} index failed (exit code {result.returncode}); see above.")
            lines = result.stdout.strip().splitlines()
            print("\n".join(lines[:-1]), flush=True)
            rows.append(json.loads(lines[-1]))
            r = rows[-1]
            print(f"  {kind}: built in {r['build_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB, 10-recall@10 "
                  f"{r['recall@10']:.3f}, R@10 {r['R@10']:.3f}", flush=True)
        print("\n| kind | build s | peak RSS MB | index files MB | 1 query p50 / p99 ms | 64 queries p50 / p99 ms "
              "| 10-recall@10 | R@10 |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['kind']} | {r['build_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['files_mb']:.0f} | "
                  f"{r['p50_1']:.2f} / {r['p99_1']:.2f} | {r['p50_64']:.2f} / {r['p99_64']:.2f} | "
                  f"{r['recall@10']:.3f} | {r['R@10']:.3f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="an export folder or a checkpoint (default: the default convnet, random weights)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--kinds", default="flat,ivfsq,ivfpq,hnsw")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--index-worker", nargs=3, metavar=("KIND", "GALLERY", "WORK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.index_worker:
        kind, gallery, work = args.index_worker
        print(json.dumps(index_worker(kind, Path(gallery), Path(work))), flush=True)
        return 0
    if not args.skip_embed:
        bench_embedding(args.model, args.rounds, args.batch_size)
    if not args.skip_index:
        bench_index(args.vectors, args.kinds.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
