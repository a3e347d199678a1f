"""Scaling: training throughput for 1, 2, ... N processes, recog's loop against a bare DDP loop.

The original system's experiment (training time against the number of workers, ResNet-50 on
MNIST): here ResNet-50 on 28×28 one-channel input (recog's small-input stem) and the default
`convnet`, weak scaling (the per-process batch stays fixed, so the global batch grows with the
workers). For each model and each process count n, a real `torchrun --nproc_per_node=n` runs
bench/overhead.py's measurement: recog's `train_one_epoch` and a bare DDP loop, same model,
batch and in-memory data, in alternating rounds. From the medians:

    speed-up(n)   = throughput(n) / throughput(1)
    efficiency(n) = throughput(n) / (n × throughput(1))

for each loop, and recog / bare at each n. Writes a CSV and a PNG (speed-up against workers,
with the ideal line) and prints one table.

    .venv/bin/python bench/scaling.py                      # both models, n = 1 .. cores (or GPUs)
    .venv/bin/python bench/scaling.py --quick              # a smoke run of about a minute
    .venv/bin/python bench/scaling.py --plot docs/scaling.png

On a CPU machine every process gets one thread (OMP_NUM_THREADS=1), so n processes use n
cores: this measures how well recog uses the cores and gloo's all-reduce over loopback, not
a network. Run it on an otherwise idle machine; the CSV keeps every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import markdown_table, require

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

MODELS = {  # name: (backbone, batch per process, steps per round)
    "convnet": ("convnet", 256, 20),
    "resnet50-28px": ("resnet50", 32, 4),
}


def worker(args) -> None:
    """Inside torchrun: measure, and rank 0 prints one JSON line."""
    import overhead

    from recog import dist

    ctx = dist.setup()
    backbone, batch, steps = MODELS[args.model]
    measure_args = overhead.parser().parse_args(["--backbone", backbone, "--batch-size", str(batch), "--steps",
                                                 str(args.steps or steps), "--rounds", str(args.rounds)])
    bare, ours = overhead.measure(ctx, measure_args)
    if ctx.is_main:
        steps_per_image = 1 / (batch * ctx.world_size)
        print("RESULT " + json.dumps({
            "model": args.model, "procs": ctx.world_size, "batch": batch,
            "bare_images_per_s": statistics.median(bare), "recog_images_per_s": statistics.median(ours),
            "steps_per_image": steps_per_image}), flush=True)
    dist.teardown()


def run_one(model: str, procs: int, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(Path(__file__).resolve()), "--worker", "--model", model, "--rounds", str(args.rounds)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if not torch.cuda.is_available() else dict(os.environ)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"error: {model} with {procs} process(es) failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return json.loads(lines[0][len("RESULT "):])


def plot(rows: list[dict], path: Path, max_procs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([1, max_procs], [1, max_procs], "k--", label="ideal", linewidth=1)
    for model in dict.fromkeys(r["model"] for r in rows):
        for loop, style in (("recog", "-o"), ("bare", ":s")):
            points = [(r["procs"], r["speedup"]) for r in rows if r["model"] == model and r["loop"] == loop]
            ax.plot(*zip(*points), style, label=f"{model}, {loop}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    ax.set(xlabel="workers (processes)", ylabel="speed-up (images/s vs 1 worker)",
           title=f"recog scaling ({device})", xticks=range(1, max_procs + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--max-procs", type=int, default=torch.cuda.device_count() or os.cpu_count())
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=0, help="steps per round (default: per model)")
    p.add_argument("--quick", action="store_true", help="convnet only, 2 rounds of 5 steps")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    p.add_argument("--csv", default=str(ROOT / "bench" / "results" / f"scaling-{stamp}.csv"))
    p.add_argument("--plot", default=str(ROOT / "bench" / "results" / f"scaling-{stamp}.png"))
    args = p.parse_args()
    if args.worker:
        return worker(args)
    require("matplotlib")  # the plot is drawn at the very end
    if args.quick:
        args.models, args.rounds, args.steps = ["convnet"], 2, 5

    rows = []
    for model in args.models:
        one = None
        for procs in range(1, args.max_procs + 1):
            r = run_one(model, procs, args)
            one = one or r
            for loop in ("recog", "bare"):
                ips = r[f"{loop}_images_per_s"]
                speedup = ips / one[f"{loop}_images_per_s"]
                rows.append({"model": model, "procs": procs, "loop": loop, "images_per_s": round(ips, 1),
                             "steps_per_s": round(ips * r["steps_per_image"], 2), "speedup": round(speedup, 3),
                             "efficiency": round(speedup / procs, 3)})
            print(f"{model} x{procs}: recog {r['recog_images_per_s']:.0f} img/s, bare {r['bare_images_per_s']:.0f} "
                  f"img/s", flush=True)

    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "procs", "loop", "steps_per_s", "images_per_s", "speedup",
                                               "efficiency"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, Path(args.plot), args.max_procs)

    table = []
    for model in args.models:
        for procs in range(1, args.max_procs + 1):
            rec, bare = (next(r for r in rows if r["model"] == model and r["procs"] == procs and r["loop"] == loop)
                         for loop in ("recog", "bare"))
            table.append([model, procs, f"{rec['images_per_s']:.0f}", f"{bare['images_per_s']:.0f}",
                          f"{rec['images_per_s'] / bare['images_per_s']:.3f}", f"{rec['speedup']:.2f}",
                          f"{rec['efficiency']:.2f}", f"{bare['efficiency']:.2f}"])
    print()
    print("\n".join(markdown_table(["model", "workers", "recog img/s", "bare img/s", "recog / bare", "recog speed-up",
                                    "recog efficiency", "bare efficiency"], table, "lrrrrrrr")))
    print(f"\nCSV {args.csv}\nplot {args.plot}")


if __name__ == "__main__":
    main()
