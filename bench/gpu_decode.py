"""data.decode=gpu against data.decode=cpu on one GPU: train.py's training batches per second, on photo-sized JPEGs.

    python bench/gpu_decode.py --workdir /tmp/recog-gpu-decode     # one GPU, 16 workers: about a minute
    python bench/gpu_decode.py --workdir DIR --write-only           # only the image set (no GPU needed)
    python bench/gpu_decode.py --quick                              # smoke test; without a GPU, on the CPU

The set: --images distinct photo-like JPEGs of 500x375 at quality 90 (~115 KB, like ImageNet's: bench/loaders.py's
`jpeg` set, bench/data.py's synthetic_jpeg), each written --repeat times into training shards, and a test split of
256 of them; written once into --workdir (with a process per core) and kept there for reruns and for
bench/gpu_session.sh's ResNet-50 runs on it.

Each setting, in a process of its own: train.py's own data (recog.build.build_data on the composed config,
checked by check_config: data=images, augment=imagenet at 224 px, --workers loader workers, --batch-size) for one
rank on cuda:0, its training batches taken for --seconds after the first (worker start-up excluded) and each put
where the training step wants it: data.decode=cpu's pinned batch copied to the GPU, data.decode=gpu's decoded and
augmented there (TorchCodec, then RandomResizedCrop + flip per image). Synchronised at both ends. Prints each
setting's images/s and the ratio gpu / cpu (> 1: decoding on the GPU feeds more images per second).
--quick without a GPU runs the GPU path's code on the CPU (device cpu, check_config's refusal skipped): a smoke
test of this script, no figure to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _common import markdown_table, sync

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # recog, also when it is not installed

PHOTO = {"size": (500, 375), "quality": 90, "noise": (20, 45)}  # bench/loaders.py's jpeg set
CLASSES = 10
TEST_IMAGES = 256
SETTINGS = ("cpu", "gpu")


def photos(first: int, count: int) -> list[bytes]:
    from data import synthetic_jpeg

    rng = np.random.default_rng(first)
    return [synthetic_jpeg(rng, **PHOTO) for _ in range(count)]


def write_set(workdir: Path, images: int, repeat: int) -> None:
    """The JPEGs, made by a process per core, into workdir/train (each `repeat` times) and workdir/test."""
    from recog.data.write import Record, write_shards

    done = workdir / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == {"images": images, "repeat": repeat}:
        return
    start = time.perf_counter()
    cores = len(os.sched_getaffinity(0))
    chunk = max(1, -(-images // cores))
    with ProcessPoolExecutor(cores) as pool:
        jpegs = list(itertools.chain(*pool.map(photos, range(0, images, chunk),
                                               [min(chunk, images - i) for i in range(0, images, chunk)])))
    classes = [f"class{c}" for c in range(CLASSES)]
    records = [Record(i % CLASSES, "jpg", (lambda b=b: b), len(b), check=False)  # made here: valid JPEGs
               for i, b in enumerate(jpegs * repeat)]
    options = dict(shard_samples=10**9, shard_mb=64, workers=cores, overwrite=True, progress=False)
    write_shards(records, classes, workdir / "train", shuffle=True, **options)
    write_shards(records[:TEST_IMAGES], classes, workdir / "test", **options)
    done.write_text(json.dumps({"images": images, "repeat": repeat}))
    print(f"wrote {images} JPEGs x {repeat} ({np.mean([len(b) for b in jpegs]) / 1e3:.0f} KB each) to {workdir} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)


def measure(args, setting: str) -> dict:
    """One setting's images/s, in this process."""

    from recog.build import build_data
    from recog.config import check_config
    from recog.data.position import Position
    from recog.dist import Dist
    from recog.rundir import compose_train_config

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    overrides = ["data=images", f"data.train={args.workdir / 'train'}", f"data.test={args.workdir / 'test'}",
                 "augment=imagenet", f"data.image_size={args.size}", f"batch_size={args.batch_size}",
                 f"data.num_workers={args.workers}", f"data.decode={setting}",
                 "data.keep_decoded_mb=0"]  # decoded every epoch (the full set is too large to be kept anyway)
    cfg = compose_train_config(*overrides)
    if device.type == "cuda" or setting == "cpu":  # --quick on a CPU machine: data.decode=gpu's code on the CPU
        check_config(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    data = build_data(cfg, Dist(0, 0, 1, 1, device, None))
    begin, start, count = time.perf_counter(), None, 0
    for epoch in itertools.count():
        for batch in data.batches(Position(epoch=epoch)):
            batch.images.to(device, non_blocking=True)  # data.decode=gpu: there already
            if start is None:  # the first batch: the workers have started
                sync(device)
                start, first_s = time.perf_counter(), time.perf_counter() - begin
                continue
            count += len(batch.labels)
            if time.perf_counter() - start >= args.seconds:
                break
        if time.perf_counter() - start >= args.seconds:
            break
    sync(device)
    seconds = time.perf_counter() - start
    return {"rate": count / seconds, "notes": f"first batch after {first_s:.1f} s, {count} images in {seconds:.1f} s, "
                                              f"{epoch + 1} epoch(s)"}


def child(args) -> None:
    """Run one setting here; print `RESULT {json}` as the last line, also on failure."""
    from recog.data.loader import stop_data_workers

    try:
        result = measure(args, args.setting)
    except Exception as e:  # noqa: BLE001 - a failure becomes the setting's row; the other one still runs
        first = (str(e).strip().splitlines() or [""])[0]
        result = {"error": f"{type(e).__name__}: {first}"[:200]}
        traceback.print_exc()
    print("RESULT " + json.dumps(result), flush=True)
    stop_data_workers()  # they ignore the SIGTERM Python's exit would send them (recog/data/loader.py)


def run_setting(args, setting: str) -> dict:
    """One setting in a child process, in a process group of its own: a timeout ends its loader workers too."""
    command = [sys.executable, str(Path(__file__).resolve()), "--setting", setting, *sys.argv[1:]]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=args.timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)  # the child if it timed out; stray workers in any case
    if timed_out:
        output, _ = child.communicate()
    results = [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")]
    result = results[-1] if results else {
        "error": f"timed out after {args.timeout:.0f} s" if timed_out else f"exit code {child.returncode}"}
    if "error" in result:
        print(output[-3000:], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recog-gpu-decode"))
    parser.add_argument("--images", type=int, help="distinct JPEGs (1000; --quick 64)")
    parser.add_argument("--repeat", type=int, help="times each is written into the training shards (8; --quick 2)")
    parser.add_argument("--workers", type=int, help="loader workers (16; --quick 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, help="training crop size (224; --quick 112)")
    parser.add_argument("--seconds", type=float, help="timed per setting (6; --quick 2)")
    parser.add_argument("--timeout", type=float, default=45, help="seconds per setting, start-up included")
    parser.add_argument("--write-only", action="store_true", help="write the set, measure nothing")
    parser.add_argument("--quick", action="store_true", help="a smoke test; on the CPU without a GPU")
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # internal: one setting here
    args = parser.parse_args()
    for key, full, quick in (("images", 1000, 64), ("repeat", 8, 2), ("workers", 16, 2), ("size", 224, 112),
                             ("seconds", 6.0, 2.0)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.setting:
        return child(args)
    cuda = torch.cuda.is_available()
    if not cuda and not (args.quick or args.write_only):
        sys.exit("error: bench/gpu_decode.py measures decoding on a GPU, but torch sees no CUDA device here "
                 "(--quick: a smoke test on the CPU; --write-only: only the image set).")
    write_set(args.workdir, args.images, args.repeat)
    if args.write_only:
        return
    header = (f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'no GPU (CPU)'}, "
              f"{len(os.sched_getaffinity(0))} CPUs; {args.images} x {args.repeat} JPEGs of 500x375, "
              f"RandomResizedCrop({args.size}) + flip, batch {args.batch_size}, {args.workers} loader workers")
    print(header, flush=True)
    results = {}
    for setting in SETTINGS:
        results[setting] = run_setting(args, setting)
        shown = f"{results[setting]['rate']:.0f} images/s" if "rate" in results[setting] else results[setting]["error"]
        print(f"data.decode={setting}: {shown}", flush=True)
    cpu = results["cpu"].get("rate")
    rows = [[f"data.decode={s}", f"{r['rate']:.0f}" if "rate" in r else "-",
             f"{r['rate'] / cpu:.2f}" if "rate" in r and cpu else "-", r.get("notes") or f"failed: {r['error']}"]
            for s, r in results.items()]
    print("\n" + "\n".join(markdown_table(["setting", "images/s", "/ cpu", "notes"], rows, "lrrl")))


if __name__ == "__main__":
    main()
