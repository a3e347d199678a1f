"""recog.serve under load: requests/s and latency for 1, 8 and 32 concurrent clients, batched and one at a time.

    .venv/bin/pip install -e '.[serve,bench]'
    .venv/bin/python bench/serve.py                                   # both galleries, 10 s per case, 2 rounds
    .venv/bin/python bench/serve.py --galleries fashion --seconds 5

Galleries:
- fashion: the bundled Fashion-MNIST subset's 10,000 training images, embedded and indexed (flat), served with
  their shards (the page's thumbnails);
- synthetic-1m: 1,000,000 synthetic clustered 128-d vectors (bench/identify.py's), indexed with recog.index's
  default for that size (IVF-SQ8), stored as embeddings of the benchmark's export so that the service takes them.
The model: --checkpoint (a train.py checkpoint), or the default convnet with random weights (the speed does not
depend on the weights). Queries: the bundled test images as PNG files, sent as request bodies.

Each gallery is served by two `python -m recog.serve` processes at once, on 127.0.0.1: batched (its defaults,
--max-batch 32 --max-wait-ms 0, --batch-threads: cores / torch threads) and one request at a time (--max-batch 1
--batch-threads 1); the two alternate round by round (this machine is shared and noisy). The clients are threads
in this process with a keep-alive connection each, each sending its next request when its last one is answered,
for --seconds. Printed per case: requests/s, p50/p95/p99
latency, errors (answers other than 200: there must be none, the clients stay below --max-inflight) and the mean
number of requests that shared a model call; then the gain of batching.
Everything (clients, event loop, model, faiss) shares this machine's cores: on 2 cores the figures say what one
small machine serves, and the clients' own CPU time is part of what they measure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _common import header, markdown_table, require, rounds, row

ROOT = Path(__file__).resolve().parents[1]
MODES = {"batched": [], "one at a time": ["--max-batch", "1", "--batch-threads", "1"]}


def prepare(work: Path, checkpoint: str | None, galleries: list[str]) -> dict[str, dict]:
    """The export and each gallery's index (kept in `work` between runs: the 1M index takes a minute to build)."""
    from identify import random_checkpoint, train_config, write_gallery

    from recog.data.prepare import prepare_shards
    from recog.export import export
    from recog.index import build
    from recog.index_files import read_index_info

    work.mkdir(parents=True, exist_ok=True)
    export_dir = work / "export"
    model = Path(checkpoint) if checkpoint else random_checkpoint(work / "random.pt")
    export(model, export_dir, onnx=False, overwrite=True)
    sha = json.loads((export_dir / "model.json").read_text())["checkpoint"]["sha256"]
    data = train_config().data
    prepare_shards(data, progress=True)
    out = {}
    for name in galleries:
        index_dir = work / f"index-{name}"
        if (index_dir / "index.json").is_file() and read_index_info(index_dir).model_sha256 == sha:
            print(f"{name}: reusing {index_dir}", flush=True)
        elif name == "fashion":
            shutil.rmtree(work / "emb-fashion", ignore_errors=True)  # this script's own, from an earlier run
            subprocess.run([sys.executable, "-m", "recog.embed", f"model={export_dir}", f"data={data.train}",
                            f"out={work / 'emb-fashion'}"], check=True, cwd=ROOT)
            build(work / "emb-fashion", index_dir, overwrite=True)
        else:
            shutil.rmtree(work / "emb-synthetic", ignore_errors=True)
            write_gallery(work / "emb-synthetic", 1_000_000, model_sha256=sha)
            build(work / "emb-synthetic", index_dir, overwrite=True)
        out[name] = {"index": index_dir, "shards": data.train if name == "fashion" else None}
    return {"export": export_dir, "galleries": out}


def query_images(count: int = 200) -> list[bytes]:
    from recog.data.idx import find_idx_pair
    from recog.data.write import FASHION_MNIST_CLASSES, idx_records

    records, _ = idx_records(*find_idx_pair(ROOT / "data" / "fashion-mnist-subset", "test"), FASHION_MNIST_CLASSES)
    return [record.read() for record in records[:count]]


def load(url: str, clients: int, seconds: float, bodies: list[bytes], path: str, headers: dict | None = None) -> dict:
    """`clients` closed-loop clients for `seconds`, a thread and a keep-alive connection each (the standard
    library's http.client: an asyncio client in this process cost so much CPU on 2 cores that it, not the service,
    set the tail at 32 clients), POSTing `bodies` in turn to `path`: each request's latency and status, and the
    batch it shared (bench/serve_peers.py uses it too, with LitServe's path and bodies)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies, statuses, batches, lock = [], [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def one_client(c: int):
        connection, i = http.client.HTTPConnection(host, int(port), timeout=60), c
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            connection.request("POST", path, body=bodies[i % len(bodies)], headers=headers or {})
            response = connection.getresponse()
            body = response.read()
            with lock:
                latencies.append(time.perf_counter() - started)
                statuses.append(response.status)
                if response.status == 200:
                    batches.append(json.loads(body)["batch"])
            i += clients
        connection.close()

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"rate": len(statuses) / elapsed, "latencies": latencies, "errors": sum(s != 200 for s in statuses),
            "batches": batches}


def side_by_side(servers: dict, clients: int, args, images: list[bytes]) -> tuple[dict, dict]:
    """Each mode's server under `clients` clients, alternating round by round: requests/s per round, and each
    round's latencies and errors."""
    results: dict[str, list[dict]] = {mode: [] for mode in servers}

    def case(mode):
        def one_round(_round):
            results[mode].append(load(servers[mode].url, clients, args.seconds, images, f"/identify?k={args.k}"))
            return results[mode][-1]["rate"]
        return one_round

    return rounds({mode: case(mode) for mode in servers}, args.rounds), results


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--galleries", nargs="+", default=["fashion", "synthetic-1m"], choices=["fashion", "synthetic-1m"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per case and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--checkpoint", help="a train.py checkpoint (default: the default convnet, random weights)")
    p.add_argument("--work", default="/tmp/recog-bench-serve", help="export, embeddings and indexes (kept)")
    args = p.parse_args()
    require("fastapi", "uvicorn", "faiss", extra="serve,bench")
    from recog.testing import ServeProcess

    setup = prepare(Path(args.work), args.checkpoint, args.galleries)
    images = query_images()
    columns = [("gallery", "<13"), ("mode", "<14"), ("clients", ">7"), ("req/s", ">7.1f"), ("p50 ms", ">7.1f"),
               ("p95 ms", ">7.1f"), ("p99 ms", ">7.1f"), ("errors", ">6"), ("batch", ">5.1f")]
    table, gains = [], []
    print(header(columns), flush=True)
    for name, gallery in setup["galleries"].items():
        serve_args = ["--model", setup["export"], "--index", gallery["index"]]
        if gallery["shards"]:
            serve_args += ["--shards", gallery["shards"]]
        servers = {mode: ServeProcess(*serve_args, *extra) for mode, extra in MODES.items()}
        try:
            for clients in args.clients:
                rates, results = side_by_side(servers, clients, args, images)
                for mode in MODES:
                    latencies = [x for r in results[mode] for x in r["latencies"]]
                    table.append([name, mode, clients, statistics.median(rates[mode]), percentile(latencies, 50),
                                  percentile(latencies, 95), percentile(latencies, 99),
                                  sum(r["errors"] for r in results[mode]),
                                  statistics.mean([x for r in results[mode] for x in r["batches"]] or [0])])
                    print(row(columns, table[-1]), flush=True)
                gains.append([name, clients, statistics.median(rates["batched"]) /
                              statistics.median(rates["one at a time"])])
        finally:
            for server in servers.values():
                server.stop()
    shown = [[*r[:3], *(f"{x:.1f}" for x in r[3:7]), r[7], f"{r[8]:.1f}"] for r in table]
    print("\n" + "\n".join(markdown_table([c for c, _ in columns], shown, "llrrrrrrr")))
    print("\ngain of batching (batched req/s / one-at-a-time req/s):")
    for name, clients, gain in gains:
        print(f"  {name}, {clients} clients: {gain:.2f}x")
    return 0 if all(r[7] == 0 for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
