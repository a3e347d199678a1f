r"""Does recog train a user's own images as well as a plain PyTorch script? Side by side, per image set.

    .venv/bin/python bench/quality.py                                  # fashion-small, both sides
    .venv/bin/python bench/quality.py --sets all --only baseline      # the baseline on every set found
    .venv/bin/python bench/quality.py --recog-args "optim=adamw"      # recog with extra overrides

Each set (bench/quality_data.py: real images written as class folders, OUT/NAME/{train,test}/<class>/)
is trained twice:

- baseline: the ~100-line script below, what a competent user writes by hand: torchvision ImageFolder
  (1 channel for grey images), a 6-layer BatchNorm CNN (32-64-128 wide), AdamW + OneCycle, batch 128,
  random crop padded by 1/8 of the side (4 px at 28-32 px) + horizontal flip (not for digits), mean/std
  of the training images, 12 epochs, one process, one loader worker. No recog code.
- recog, exactly as its README tells a user with their own images, no flags but paths (and --recog-args;
  on digits augment.flip=0, the one choice the README leaves to the user, made as the baseline makes it):
      python -m recog.data write folder SRC/train SHARDS/train   (and test)
      OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py data=images \
          data.train=SHARDS/train data.test=SHARDS/test hydra.run.dir=RUN
  and RUN/metrics.json's top1. Its seconds include writing the shards.

Both report top-1 on the test folder after the last epoch, and wall seconds.
`--epochs N` / `--seed N` go to both sides (unless given, the baseline trains 12 epochs
and recog its own default, 10; both seed 0).

data=images takes channels, size and mean/std from the shards' manifest (data.*=auto); before that,
the grey 28 px figures were measured with
    .venv/bin/python bench/quality.py --recog-args "data.channels=1 data.image_size=28 data.mean=[0.5] data.std=[0.5]"

Seconds are wall time on a shared machine: compare them only within one run. On a busy machine the
baseline's two OpenMP threads wait on each other (3x slower here under a load of 4); run it with
OMP_NUM_THREADS=1 there (recog's processes always get one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_data

ROOT = Path(__file__).resolve().parents[1]
NO_FLIP = {"digits"}  # a mirrored digit is another digit (or none)


# ---- baseline: plain PyTorch, no recog --------------------------------------------------------------

def load_image(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def baseline_model(channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        conv_bn(channels, 32), conv_bn(32, 32), nn.MaxPool2d(2),
        conv_bn(32, 64), conv_bn(64, 64), nn.MaxPool2d(2),
        conv_bn(64, 128), conv_bn(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


def mean_std(folder: Path, loader) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images (ToTensor scale, 0..1)."""
    data = datasets.ImageFolder(folder, transform=transforms.ToTensor(), loader=loader)
    total, total_sq, pixels = 0.0, 0.0, 0
    for x, _ in DataLoader(data, batch_size=500, num_workers=1):
        total = total + x.sum(dim=(0, 2, 3))
        total_sq = total_sq + (x * x).sum(dim=(0, 2, 3))
        pixels += x.numel() // x.shape[1]
    mean = total / pixels
    return mean.tolist(), (total_sq / pixels - mean * mean).sqrt().tolist()


def baseline(data_dir: Path, epochs: int, seed: int, flip: bool) -> float:
    torch.manual_seed(seed)
    first = next(p for p in sorted((data_dir / "train").rglob("*")) if p.is_file())
    with Image.open(first) as image:  # the sets are of one size and one kind: grey or colour
        mode, size = ("L" if image.mode in ("1", "L", "LA", "I", "I;16") else "RGB"), image.size[0]
    loader = partial(load_image, mode=mode)  # a partial, not a lambda: the worker process pickles it
    mean, std = mean_std(data_dir / "train", loader)
    augment = [transforms.RandomCrop(size, padding=max(1, round(size / 8)))]
    augment += [transforms.RandomHorizontalFlip()] if flip else []
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train = datasets.ImageFolder(data_dir / "train", transforms.Compose(augment + normalize), loader=loader)
    test = datasets.ImageFolder(data_dir / "test", transforms.Compose(normalize), loader=loader)
    train_loader = DataLoader(train, batch_size=128, shuffle=True, num_workers=1, drop_last=True,
                              persistent_workers=True, generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(test, batch_size=500, num_workers=1)

    model = baseline_model(len(mean), len(train.classes))
    # AdamW's weight decay is decoupled (scaled by the LR), so 0.05 is the usual order, not 5e-4.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, epochs=epochs,
                                                    steps_per_epoch=len(train_loader))
    for epoch in range(epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()  # OneCycle steps per batch
        print(f"  baseline epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)

    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(test)


# ---- recog's own-data path, as its README gives it ----------------------------------------------------

def recog(data_dir: Path, work: Path, extra: list[str]) -> float:
    bin_dir = Path(sys.executable).parent
    shards, run = work / "shards", work / "run"
    # A fresh start each time: old shards would need --overwrite, an old run dir would be resumed.
    shutil.rmtree(shards, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    for split in ("train", "test"):
        subprocess.run([sys.executable, "-m", "recog.data", "write", "folder", str(data_dir / split),
                        str(shards / split)], cwd=ROOT, check=True)
    subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node=2", "train.py", "data=images",
                    f"data.train={shards / 'train'}", f"data.test={shards / 'test'}", f"hydra.run.dir={run}",
                    *extra], cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((run / "metrics.json").read_text())["top1"]


def timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="fashion-small",
                   help=f"comma-separated, or 'all' (those on this machine): {', '.join(quality_data.SETS)}")
    p.add_argument("--only", choices=["baseline", "recog"], help="run one side only")
    p.add_argument("--epochs", type=int, help="both sides (default: the baseline 12, recog its own default, 10)")
    p.add_argument("--seed", type=int, help="both sides (default: 0, recog's own default)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips on any set, both sides")
    p.add_argument("--recog-args", default="", help="extra train.py overrides, e.g. \"optim=adamw epochs=20\"")
    p.add_argument("--out", type=Path, default=Path("/tmp/recog-quality"), help="images, shards and runs")
    args = p.parse_args()

    names = quality_data.available() if args.sets == "all" else args.sets.split(",")
    extra = shlex.split(args.recog_args)
    extra += [f"epochs={args.epochs}"] if args.epochs is not None else []
    extra += [f"seed={args.seed}"] if args.seed is not None else []
    rows = []
    for name in names:
        data_dir = quality_data.write_set(name, args.out / "images")
        base = recog_result = (None, None)
        if args.only != "recog":
            print(f"{name}: baseline", flush=True)
            base = timed(baseline, data_dir, args.epochs or 12, args.seed or 0,
                         not args.no_flip and name not in NO_FLIP)
            print(f"{name}: baseline top-1 {base[0]:.4f} in {base[1]:.0f} s", flush=True)
        if args.only != "baseline":
            # The one choice left to the user (README): no flips where a mirror image is another class. The
            # baseline makes the same choice for the same sets.
            own = extra + (["augment.flip=0"] if args.no_flip or name in NO_FLIP else [])
            print(f"{name}: recog {' '.join(own)}", flush=True)
            recog_result = timed(recog, data_dir, args.out / "recog" / name, own)
            print(f"{name}: recog top-1 {recog_result[0]:.4f} in {recog_result[1]:.0f} s", flush=True)
        rows.append((name, *base, *recog_result))

    def cell(value, spec):
        return "" if value is None else format(value, spec)

    no_flip = "every set" if args.no_flip else ", ".join(sorted(NO_FLIP))
    print(f"\nrecog args: {' '.join(extra) or '(none)'}; augment.flip=0 on {no_flip}, as the baseline")
    print("| set | baseline top-1 | baseline s | recog top-1 | recog s | recog - baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, b_top1, b_s, r_top1, r_s in rows:
        diff = r_top1 - b_top1 if None not in (b_top1, r_top1) else None
        print(f"| {name} | {cell(b_top1, '.4f')} | {cell(b_s, '.0f')} | {cell(r_top1, '.4f')} | "
              f"{cell(r_s, '.0f')} | {cell(diff, '+.4f')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
