r"""A million classes end to end (issue 30): train.py with model.classifier=sharded on 2 processes over shards
written by `recog.data write`, then the same run resumed on 1 process, which must carry on as the 2 processes did.

    .venv/bin/python bench/million.py --work /tmp/million       # --classes 1000000 --products 1600 --epochs 1

The data (real images, made into a catalogue of many classes): PRODUCTS Fashion-MNIST training images, each one a
product, spread evenly over CLASSES class numbers (0 and CLASSES-1 included, so the shards name every class and
the classifier has CLASSES rows, most of them never seen, as in a catalogue whose new products have no photos yet).
Each product has 4 training photos and 1 test photo: its image shifted by up to 2 pixels, with a little noise.
Both splits are written as idx files with 32-bit labels and turned into shards by `python -m recog.data write idx`.

Two runs of train.py (OMP_NUM_THREADS=1, the default convnet at width 16, a 64-wide embedding, AdamW, global
batch 32, warmup over the first 0.2 of the steps):

- two:  2 processes, model.classifier=sharded (each holds CLASSES/2 rows and their AdamW state), EPOCHS epochs,
        a checkpoint every 20 steps (each rank writes its rows' file);
- one:  1 process, resume= two's checkpoint 20 steps before its end (its two rows files re-sliced into one),
        trained to the same end: the softmax is exact (loss.sample_rate=1) and the global batch is kept, so it
        must reach the rows two reached, up to rounding;
- then two's last rows are compared with one's (read from their rows files with recog.classifier_files.read_rows),
  and two's last backbone weights with one's (step-N.pt; BatchNorm's running statistics left out: under DDP each
  rank's come from its own micro-batches, and rank 0's are kept, so they differ from one process's by design).

It prints each run's wall time, seconds per step, top-1 on the test photos (one right class among CLASSES; it
differs between the two runs by their BatchNorm statistics) and the largest differences, against how far the last
20 steps moved each.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
GLOBAL_BATCH, TAIL = 32, 20


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST-format file: uint8 images, or big-endian int32 labels (idx type 0x0C)."""
    code, body = (0x08, array.astype(np.uint8)) if array.ndim > 1 else (0x0C, array.astype(">i4"))
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + body.tobytes())


def photos(base: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` photos of each image of `base` (P, 28, 28): shifted by up to 2 pixels, with noise (σ 8 grey levels)."""
    out = []
    for _ in range(count):
        dy, dx = rng.integers(-2, 3, size=2)
        shifted = np.roll(base, (dy, dx), axis=(1, 2)).astype(np.float32) + rng.normal(0, 8, base.shape)
        out.append(shifted.clip(0, 255).astype(np.uint8))
    return np.stack(out, axis=1)  # P × count × 28 × 28


def make_data(work: Path, classes: int, products: int) -> dict[str, Path]:
    from recog.data.idx import read_idx

    images = read_idx(FASHION)[:products]
    labels = np.round(np.linspace(0, classes - 1, products)).astype(np.int64)
    rng = np.random.default_rng(0)
    shots = photos(images, 5, rng)
    out = {}
    for split, photo_slice in (("train", slice(0, 4)), ("test", slice(4, 5))):
        folder = work / "data" / split
        if (folder / "manifest.json").exists():
            out[split] = folder
            continue
        split_images = shots[:, photo_slice].reshape(-1, 28, 28)
        split_labels = np.repeat(labels, photo_slice.stop - photo_slice.start)
        raw = work / "idx"
        raw.mkdir(parents=True, exist_ok=True)
        write_idx(raw / f"{split}-images.gz", split_images)
        write_idx(raw / f"{split}-labels.gz", split_labels)
        subprocess.run([sys.executable, "-m", "recog.data", "write", "idx", str(raw / f"{split}-images.gz"),
                        str(raw / f"{split}-labels.gz"), str(folder)], check=True, cwd=ROOT)
        out[split] = folder
    return out


def train(args: list[str], nproc: int, log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "train.py", *args],
                              cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"error: train.py failed (status {done.returncode}); see {log}")
    return seconds


def rows_folder(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:09d}.rows"


def read_all_rows(folder: Path, classes: int):
    from recog.classifier_files import read_rows

    return read_rows(folder, range(0, classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/million"))
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--products", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--sample-rate", type=float, default=1.0)
    options = parser.parse_args()
    work = options.work
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, options.classes, options.products)
    steps_per_epoch = options.products * 4 // GLOBAL_BATCH  # the last step may be short
    end = steps_per_epoch * options.epochs
    common = [f"data.train={data['train']}", f"data.test={data['test']}", "data.prepare=null",
              "data.num_workers=1", "model.width=16", "model.classifier=sharded", f"global_batch={GLOBAL_BATCH}",
              "batch_size=16", "model.embedding_dim=64", f"epochs={options.epochs}", "log_every=10",
              f"checkpoint.every_steps={TAIL}", "checkpoint.keep=3", "schedule.warmup_epochs=0.2",
              f"loss.sample_rate={options.sample_rate}"]
    two_dir, one_dir = work / "two", work / "one"
    figures = {}
    if not (two_dir / "metrics.json").exists():
        figures["two"] = train(common + [f"hydra.run.dir={two_dir}"], 2, work / "two.log")
    restart = end - TAIL
    if not (one_dir / "metrics.json").exists():
        checkpoint = two_dir / "checkpoints" / f"step-{restart:09d}.pt"
        figures["one"] = train(common + [f"hydra.run.dir={one_dir}", f"resume={checkpoint}"], 1, work / "one.log")

    two_end = read_all_rows(rows_folder(two_dir, end), options.classes)
    one_end = read_all_rows(rows_folder(one_dir, end), options.classes)
    two_restart = read_all_rows(rows_folder(two_dir, restart), options.classes)
    moved = (two_end["weight"] - two_restart["weight"]).abs().max().item()
    differ = (two_end["weight"] - one_end["weight"]).abs().max().item()
    print(f"{options.classes:,} classes, {options.products:,} products x 4 photos, global batch {GLOBAL_BATCH}, "
          f"{end} steps ({options.epochs} epochs), loss.sample_rate={options.sample_rate}")
    print("| run | processes | steps | wall s | s/step | top-1 (test photos) |")
    print("|---|---|---|---|---|---|")
    for name, nproc, steps in (("two", 2, end), ("one (resumed)", 1, TAIL)):
        run = two_dir if name == "two" else one_dir
        metrics = json.loads((run / "metrics.json").read_text())
        wall = figures.get(name.split()[0])
        per = f"{wall / steps:.2f}" if wall else "(earlier run)"
        print(f"| {name} | {nproc} | {steps} | {wall:.0f} | {per} | {metrics['top1']:.4f} |" if wall else
              f"| {name} | {nproc} | {steps} | (earlier run) | {per} | {metrics['top1']:.4f} |")
    layouts = {name: json.loads((rows_folder(run, end) / "slices.json").read_text())
               for name, run in (("two", two_dir), ("one", one_dir))}
    print(f"rows files at step {end}: two {[e['name'] for e in layouts['two']['files']]}, "
          f"one {[e['name'] for e in layouts['one']['files']]}")
    from recog.checkpoint import load_checkpoint

    models = [load_checkpoint(str(run / "checkpoints" / f"step-{step:09d}.pt"), "the checkpoint")["model"]
              for run, step in ((two_dir, end), (one_dir, end), (two_dir, restart))]
    learnt = [k for k, v in models[0].items() if v.is_floating_point() and "running_" not in k]
    backbone_moved = max((models[0][k] - models[2][k]).abs().max().item() for k in learnt)
    backbone_differ = max((models[0][k] - models[1][k]).abs().max().item() for k in learnt)
    print(f"backbone: the last {TAIL} steps moved it by up to {backbone_moved:.3g}; two's and one's differ by up to "
          f"{backbone_differ:.3g}")
    print(f"rows: the last {TAIL} steps moved them by up to {moved:.3g}; two's and one's differ by up to {differ:.3g}")


if __name__ == "__main__":
    main()
