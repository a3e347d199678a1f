"""recog.serve against LitServe on the same model: requests/s and p50/p99 latency at 1, 8 and 32 clients.

    .venv/bin/pip install -e '.[serve,bench]'
    .venv/bin/python bench/serve_peers.py                          # 10 s per case and round, 5 rounds
    .venv/bin/python bench/serve_peers.py --seconds 6 --rounds 5 --clients 8 32
    .venv/bin/python bench/serve_peers.py --recog-variant '--batch-threads 1'   # and a third server in the rotation

Both servers answer "what is this photo?" from the same export (bench/serve.py's: the default convnet, random
weights, or --checkpoint) and the same faiss index (the Fashion-MNIST subset's 10,000 training images, flat),
decode with the same function (recog.serve.decode_upload) and answer the same JSON:
- recog: `python -m recog.serve --model EXPORT --index INDEX` with its defaults (--max-batch 32, --max-wait-ms 0),
  the image as the request body;
- LitServe: bench/serve_litserve.py (a LitAPI with LitServe's batching, max_batch_size 32 and batch_timeout
  --litserve-timeout-s; workers_per_device = the cores; fast_queue), the image as base64 in a JSON body (its request
  handler reads JSON or a form, not a raw body).
Both are processes of their own on 127.0.0.1, started once and kept; one torch thread per process
(OMP_NUM_THREADS=1, as bench/serve.py). The client is bench/serve.py's: threads with a keep-alive connection each,
each sending its next request when its last is answered, for --seconds; the two servers alternate round by round
(this machine is shared and noisy) and the figures are the medians of the rounds: requests/s, p50 and p99 latency
(each round's own percentile), errors (answers other than 200) and the mean batch. Then recog/LitServe.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import header, markdown_table, require, row

ROOT = Path(__file__).resolve().parents[1]


class LitServeProcess:
    """bench/serve_litserve.py on a free port of 127.0.0.1, ready when its /health answers 200."""

    def __init__(self, *args: str, start_timeout_s: float = 180):
        with socket.socket() as s:  # LitServe takes a port number, not 0: a free one, asked of the kernel
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "serve_litserve.py"), *map(str, args),
                                         "--port", str(port)], env=env, cwd=ROOT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("bench/serve_litserve.py did not start (its output is above)")

    def stop(self) -> None:
        """Its whole process group (its own session: the API servers and inference workers it forked and
        spawned), which SIGTERM to the main process alone leaves running."""
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # its children, if the main process went first
        except ProcessLookupError:
            pass


def load(url: str, path: str, bodies: list[bytes], headers: dict, clients: int, seconds: float) -> dict:
    """bench/serve.py's closed-loop client with each server's path and bodies: requests/s, p50/p99 latency, the
    errors and the mean batch."""
    from serve import load as closed_loop

    result = closed_loop(url, clients, seconds, bodies, path, headers)
    ms = np.array(result["latencies"]) * 1000
    return {"rate": result["rate"], "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "errors": result["errors"], "batch": float(np.mean(result["batches"])) if result["batches"] else 0.0}


def requests_for(images: list[bytes], k: int) -> dict[str, tuple[str, list[bytes], dict]]:
    """Each server's path, bodies (made before the clock starts) and headers."""
    as_json = [json.dumps({"image": base64.b64encode(x).decode(), "k": k}).encode() for x in images]
    return {"recog": (f"/identify?k={k}", images, {"Content-Type": "application/octet-stream"}),
            "LitServe": ("/identify", as_json, {"Content-Type": "application/json"})}


def measure(servers: dict, clients: int, args, images: list[bytes]) -> dict[str, list[dict]]:
    """Each server under `clients` clients, the order rotating round by round."""
    wanted = requests_for(images, args.k)
    results: dict[str, list[dict]] = {name: [] for name in servers}
    names = list(servers)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            path, bodies, headers = wanted["LitServe" if name == "LitServe" else "recog"]
            load(servers[name].url, path, bodies, headers, min(clients, 4), 1.0)  # warm: connections, caches
            results[name].append(load(servers[name].url, path, bodies, headers, clients, args.seconds))
            print(f"  {clients} clients, round {r + 1}, {name}: {results[name][-1]['rate']:.1f} req/s", flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per case and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--checkpoint", help="a train.py checkpoint (default: the default convnet, random weights)")
    p.add_argument("--work", default="/tmp/recog-bench-serve", help="export, embeddings and indexes (kept)")
    p.add_argument("--litserve-timeout-s", type=float, default=0.01, help="LitServe's batch_timeout")
    p.add_argument("--litserve-workers", type=int, help="its workers_per_device (default: the cores; on a GPU 1)")
    p.add_argument("--device", default="cpu", help="where both compute: cpu, or cuda (recog.serve --device, "
                   "LitServer's accelerator)")
    p.add_argument("--recog-variant", action="append", default=[], metavar="ARGS",
                   help="one more recog.serve, with these arguments (e.g. '--batch-threads 1'), in the rotation")
    args = p.parse_args()
    require("fastapi", "uvicorn", "faiss", "litserve", extra="serve,bench")
    from serve import prepare, query_images

    from recog.testing import ServeProcess

    setup = prepare(Path(args.work), args.checkpoint, ["fashion"])
    index = setup["galleries"]["fashion"]["index"]
    images = query_images()
    on = ("--device", args.device)
    workers = args.litserve_workers or (1 if args.device.startswith("cuda") else os.cpu_count() or 1)  # its docs'
    servers = {"recog": ServeProcess("--model", setup["export"], "--index", index, *on)}
    for variant in args.recog_variant:
        servers[f"recog {variant}"] = ServeProcess("--model", setup["export"], "--index", index, *on, *variant.split())
    try:
        servers["LitServe"] = LitServeProcess("--model", setup["export"], "--index", index, "--batch-timeout-s",
                                              args.litserve_timeout_s, "--workers", workers,
                                              "--accelerator", "cuda" if args.device.startswith("cuda") else "cpu")
        table = report(servers, args, images)
    finally:
        for server in servers.values():
            server.stop()
    return 0 if all(r[-2] == 0 for r in table) else 1


def report(servers: dict, args, images: list[bytes]) -> list[list]:
    columns = [("server", "<24"), ("clients", ">7"), ("req/s", ">7.1f"), ("spread", ">13"), ("p50 ms", ">7.1f"),
               ("p99 ms", ">7.1f"), ("errors", ">6"), ("batch", ">5.1f")]
    table, ratios = [], []
    for clients in args.clients:
        results = measure(servers, clients, args, images)
        med = {name: {key: statistics.median(r[key] for r in rs) for key in ("rate", "p50", "p99", "batch")}
               for name, rs in results.items()}
        for name, rs in results.items():
            rates = [r["rate"] for r in rs]
            table.append([name, clients, med[name]["rate"], f"{min(rates):.0f}-{max(rates):.0f}", med[name]["p50"],
                          med[name]["p99"], sum(r["errors"] for r in rs), med[name]["batch"]])
        for name in [n for n in results if n != "LitServe"]:
            per_round = [a["rate"] / b["rate"] for a, b in zip(results[name], results["LitServe"])]
            ratios.append([name, clients, med[name]["rate"] / med["LitServe"]["rate"], min(per_round),
                           max(per_round), med[name]["p99"] / med["LitServe"]["p99"]])
    print("\n" + header(columns))
    for r in table:
        print(row(columns, r))
    shown = [[r[0], r[1], f"{r[2]:.1f}", r[3], f"{r[4]:.1f}", f"{r[5]:.1f}", r[6], f"{r[7]:.1f}"] for r in table]
    print("\n" + "\n".join(markdown_table([c for c, _ in columns], shown, "lrrrrrrr")))
    print("\nrecog/LitServe (medians of the rounds; req/s: higher is better, p99: lower is better):")
    for name, clients, rate, low, high, p99 in ratios:
        print(f"  {name}, {clients:>2} clients: req/s {rate:.2f}x (rounds {low:.2f}-{high:.2f}), p99 {p99:.2f}x")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return table


if __name__ == "__main__":
    sys.exit(main())
