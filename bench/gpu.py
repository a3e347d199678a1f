"""One-GPU benchmark: ResNet-50 training images/s and the shard loader's images/s, printed as one table.

    bash bench/gpu.sh            # one H100/H200: about 3.5 minutes, at most 5
    bash bench/gpu.sh --quick    # smoke test: resnet18 on 32x32, 200 images; runs on CPU without a GPU

Training (recog's RecognitionModel with a resnet50 backbone, ImageNet stem, 1000 classes;
synthetic 224x224 batches already on the GPU, so no input pipeline; SGD with momentum,
cross-entropy; cudnn.benchmark on; batch 128, or 64 if 128 runs out of memory):
  fp32            NCHW, TF32 off: the baseline every training ratio is against
  tf32            NCHW, TF32 allowed for matmuls and convolutions
  bf16+CL         bf16 autocast, channels_last
  bf16+CL+compile the same under torch.compile (default mode); includes a cold compile
Each case warms up (cudnn autotuning, compilation), then runs three timed windows
of a fixed number of steps, synchronised at both ends; the table shows the median.

Loader: 2,000 synthetic 224x224 JPEGs (bench/data.py's generator, each written 8 times to
16,000 samples, so that an epoch is longer than the workers' start of each epoch) written
by recog's shard writer, then read by recog's ShardStream + make_loader (forkserver workers,
RandomResizedCrop + flip on uint8, pin_memory) and copied to the GPU, for 4, 8 and 12
workers; timed from the first batch (worker start-up excluded) for about 6 s. Their ratio
is against the fastest training case: >= 1 means that many workers keep the GPU fed.

Every case runs in its own process (a failed compile, an out-of-memory error or a hang
cannot take the others down) with a time limit; its row then says "failed: <reason>".
The compile case may use all the time left (TF32, the least important, runs after
it); after 4 minutes the remaining cases are skipped. Each case's output is kept in --log-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import markdown_table, sync

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # recog and bench.data, also when recog is not installed

TRAIN_CASES = {  # name: (table label, tf32, bf16 autocast + channels_last, torch.compile)
    "fp32": ("ResNet train fp32 NCHW, TF32 off", False, False, False),
    "tf32": ("ResNet train fp32 NCHW, TF32 on", True, False, False),
    "bf16-cl": ("ResNet train bf16 + channels_last", True, True, False),
    "bf16-cl-compile": ("ResNet train bf16 + channels_last + compile", True, True, True),
}
FULL = {"model": "resnet50", "size": 224, "batch": 128, "warmup": 10, "windows": 3, "window_s": 3.0, "images": 2000,
        "repeat": 8, "workers": (4, 8, 12), "loader_s": 6.0, "case_cap_s": 75, "deadline_s": 280,
        "skip_after_s": 240}
QUICK = {"model": "resnet18", "size": 32, "batch": 32, "warmup": 2, "windows": 3, "window_s": 0.5, "images": 200,
         "repeat": 1, "workers": (1, 2), "loader_s": 2.0, "case_cap_s": 40, "deadline_s": 115, "skip_after_s": 105}


def train_rate(cfg: dict, case: str, batch: int, device: torch.device, deadline: float) -> tuple[float, str]:
    from recog.model import RecognitionModel

    _, tf32, bf16_cl, compiled = TRAIN_CASES[case]
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    fmt = torch.channels_last if bf16_cl else torch.contiguous_format
    torch.manual_seed(0)
    # small_input=False: the ImageNet stem (7x7 stride-2 conv + max-pool), also for the quick run's 32x32
    model = RecognitionModel(cfg["model"], num_classes=1000, in_channels=3, small_input=False)
    model = model.to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    images = torch.randn(batch, 3, cfg["size"], cfg["size"], device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_cl):
            loss = F.cross_entropy(forward(images).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(cfg["warmup"]):
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(3):  # how long a step takes, to size the windows
        step()
    sync(device)
    per_step = (time.perf_counter() - start) / 3
    left = deadline - time.time() - 3  # the windows shrink to fit (after a slow compile)
    steps = max(3, round(min(cfg["window_s"], left / cfg["windows"]) / per_step))
    if steps * per_step * cfg["windows"] > left:
        raise RuntimeError(f"no time left to measure after a {warm_s:.0f} s warm-up")
    rates = []
    for _ in range(cfg["windows"]):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    spread = (max(rates) - min(rates)) / statistics.median(rates)
    notes = f"batch {batch}, warm-up {warm_s:.0f} s, {cfg['windows']}x{steps} steps, spread {spread:.0%}"
    return statistics.median(rates), notes


def train_case(cfg: dict, case: str, device: torch.device, deadline: float) -> tuple[float, str]:
    try:
        return train_rate(cfg, case, cfg["batch"], device, deadline)
    except torch.OutOfMemoryError:
        pass  # retried outside the handler, so that the traceback's tensors are freed first
    torch.cuda.empty_cache()
    rate, notes = train_rate(cfg, case, cfg["batch"] // 2, device, deadline)
    return rate, f"{notes} (out of memory at {cfg['batch']})"


def loader_case(cfg: dict, workers: int, device: torch.device, shards: str) -> tuple[float, str]:
    from torchvision.transforms import v2

    from recog.data.loader import make_loader
    from recog.data.manifest import load_manifest
    from recog.data.stream import ShardStream

    augment = v2.Compose([v2.RandomResizedCrop(cfg["size"], antialias=True), v2.RandomHorizontalFlip()])
    stream = ShardStream(load_manifest(shards), rank=0, world_size=1, batch_size=cfg["batch"], transform=augment,
                         channels=3, train=True)
    loader = make_loader(stream, workers, pin_memory=device.type == "cuda")
    begin, start, count, epoch = time.perf_counter(), None, 0, 0
    while start is None or time.perf_counter() - start < cfg["loader_s"]:
        stream.set_epoch(epoch)
        for batch in loader:
            batch.images.to(device, non_blocking=True)
            if start is None:  # the first batch: workers have started
                sync(device)
                start, first_s = time.perf_counter(), time.perf_counter() - begin
            else:
                count += len(batch.labels)
                if time.perf_counter() - start >= cfg["loader_s"]:
                    break
        epoch += 1
    sync(device)
    rate = count / (time.perf_counter() - start)
    del loader  # shuts the workers down
    return rate, f"batch {cfg['batch']}, first batch after {first_s:.1f} s, {count} images timed, {epoch} epoch(s)"


def write_data(cfg: dict, folder: str) -> None:
    """Synthetic JPEGs -> WebDataset shards in `folder`, written by recog's shard writer."""
    import numpy as np

    from bench.data import synthetic_jpeg
    from recog.data.write import Record, write_shards

    rng = np.random.default_rng(0)
    jpegs = [synthetic_jpeg(rng, cfg["size"]) for _ in range(cfg["images"])]
    records = [Record(i % 100, "jpg", (lambda b=b: b), len(b)) for i, b in enumerate(jpegs * cfg["repeat"])]
    write_shards(records, [f"class{c}" for c in range(100)], folder, shard_samples=2000, shuffle=True, progress=False)


def run_case(args, case: str, timeout: float, log: Path) -> tuple[float | None, str]:
    """Run one case in a child process (its own process group, so a timeout also ends its loader workers)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--deadline", str(time.time() + timeout)]
    command += ["--quick"] * args.quick + ["--shards", args.shards]
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the child if it timed out; its stray workers in any case
        except ProcessLookupError:
            pass
        code = child.wait()
    lines = log.read_text(errors="replace").splitlines()
    results = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    if results and "rate" in results[-1]:
        return results[-1]["rate"], results[-1]["notes"]
    if results:
        return None, f"failed: {results[-1]['error']}"
    if timed_out:
        return None, f"failed: timed out after {timeout:.0f} s (log {log})"
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    return None, f"failed: exit code {code}: {last[:200]}"


def child(args) -> None:
    """Run one case in this process; print `RESULT {json}` as the last line, also on failure."""
    cfg, device = QUICK if args.quick else FULL, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.case.startswith("loader-"):
            rate, notes = loader_case(cfg, int(args.case.split("-")[1]), device, args.shards)
        else:
            rate, notes = train_case(cfg, args.case, device, args.deadline)
        result = {"rate": rate, "notes": notes}
    except Exception as e:  # noqa: BLE001 - any failure becomes the case's row; the other cases still run
        first = (str(e).strip().splitlines() or [""])[0]
        result = {"error": f"{type(e).__name__}: {first}"[:200]}
        traceback.print_exc()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke test (resnet18, 32x32); CPU if no GPU")
    parser.add_argument("--log-dir", help="each case's output (default bench/results/gpu-<time>)")
    parser.add_argument("--budget", type=float, help="seconds for the whole table (default 280; bench/gpu_session.sh "
                        "passes what its session has left): cases that would not fit are skipped")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return child(args)
    start = time.monotonic()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        sys.exit("error: bench/gpu.sh measures a GPU, but torch sees no CUDA device here "
                 "(run `bash bench/gpu.sh --quick` for a CPU smoke test).")
    cfg = QUICK if args.quick else FULL
    if args.budget:  # the last 40 s of a budget are for the case that started before them (as FULL's 240 of 280)
        cfg = {**cfg, "deadline_s": args.budget, "skip_after_s": max(args.budget - 40, 0)}
    log_dir = Path(args.log_dir or ROOT / "bench" / "results" / time.strftime("gpu-%Y%m%d-%H%M%S"))
    log_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if cuda else "no GPU (CPU)"
    header = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
              f"{device_name}, {os.cpu_count()} CPUs{' (--quick: a smoke test, not comparable)' if args.quick else ''}")
    print(header, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="recog-gpu-bench-")
    args.shards = str(Path(tmp.name) / "shards")
    data = ThreadPoolExecutor(1).submit(write_data, cfg, args.shards)  # written while the first cases run
    loaders = [f"loader-{n}" for n in cfg["workers"]]
    # By priority: the compile case may take whatever time is left, then TF32 runs if there is time still
    order = ["fp32", "bf16-cl", *loaders, "bf16-cl-compile", "tf32"]
    results: dict[str, tuple[float | None, str]] = {}
    for case in order:
        elapsed = time.monotonic() - start
        left = cfg["deadline_s"] - elapsed
        if elapsed > cfg["skip_after_s"] or left < 15:
            results[case] = (None, "skipped: time budget")
        elif case == "bf16-cl-compile" and not cuda:
            results[case] = (None, "skipped: compile on CPU takes minutes (--quick without GPU)")
        elif case.startswith("loader-") and data.exception():  # waits for the shards
            results[case] = (None, f"failed: writing the shards: {data.exception()!r}"[:200])
        else:
            cap = left if case == "bf16-cl-compile" else min(cfg["case_cap_s"], left)
            results[case] = run_case(args, case, cap, log_dir / f"{case}.log")
        rate, notes = results[case]
        shown = f"{rate:.0f} images/s" if rate is not None else notes
        print(f"[{time.monotonic() - start:4.0f} s] {case}: {shown}", flush=True)
    wait([data])  # the writer may still run if every loader case was skipped
    tmp.cleanup()

    base = results["fp32"][0]
    fastest = max((results[c][0] or 0 for c in TRAIN_CASES), default=0)
    rows = []
    for case in [*TRAIN_CASES, *loaders]:
        rate, notes = results[case]
        label = TRAIN_CASES[case][0] if case in TRAIN_CASES else f"Loader, num_workers={case.split('-')[1]}"
        ref = base if case in TRAIN_CASES else fastest
        ratio = f"{rate / ref:.2f}" if rate and ref else "-"
        rows.append([label, f"{rate:.0f}" if rate else "-", ratio, notes])
    table = "\n".join([
        f"\n{header}",
        (f"{cfg['model']} at {cfg['size']}x{cfg['size']}; training ratio: against fp32 TF32 off; "
         "loader ratio: against the fastest training case (>= 1: keeps it fed)"),
        "", *markdown_table(["case", "images/s", "ratio", "notes"], rows, "lrrl"),
        f"\ntotal {time.monotonic() - start:.0f} s; each case's output in {log_dir}",
    ])
    print(table)
    (log_dir / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
