r"""A catalogue that grows (issue 29): is yesterday's model, continued on today's images with a replay of the
past, as good as training from scratch on everything, for less work?

    .venv/bin/python bench/growth.py folders OUT       # the bundled data written as two days of class folders
    .venv/bin/python bench/growth.py run               # seeds 0 and 1; --seeds 0 1 2, --work DIR, --mix, --epochs

The bundled Fashion-MNIST subset (10,000 training and 2,000 test images, 10 classes), written as two days:

- day 1 holds 7 of the 10 classes (T-shirt/top ... Shirt, labels 0-6): the first 60 % of each one's training
  images, in file order;
- day 2 holds the other 40 % of those classes' images, and every image of the 3 new classes (Sneaker, Bag,
  Ankle boot);
- test: the 2,000 test images of all 10 classes; test-day1: those of day 1's 7 classes.

Per seed, three runs of train.py on 2 processes (OMP_NUM_THREADS=1), the default recipe (data=images, every
data.* auto):

- (a) from scratch on data.train=[day1,day2], 10 epochs: top-1 on the 10-class test split, and the images it
  trained on (steps x global batch);
- day 1's model: data.train=day1, data.test=test-day1, 10 epochs (yesterday's run);
- (b) weights= day 1's last.pt, data.train=[day1,day2] with data.mix=[MIX,1] (a fresh seeded MIX share of day 1
  each epoch, all of day 2), EPOCHS epochs: top-1 on the 10-class test split, the images it trained on.

and, in this process, the 3 new classes' top-1 on the test split at (b)'s start, the classifier its first step
trains from: new rows imprinted (weights= maps the old rows by name, imprint_images of each new class's
training images embedded and averaged) against new rows started fresh (imprint_images=0).

The bar (issue 29): (b)'s top-1 within 0.01 of (a)'s, with at most half of (a)'s images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: recog is imported from this checkout

from recog.data.idx import find_idx_pair, read_idx  # noqa: E402  (after the sys.path line)
from recog.data.write import FASHION_MNIST_CLASSES  # noqa: E402

BUNDLED = ROOT / "data" / "fashion-mnist-subset"
OLD, NEW = range(7), range(7, 10)  # day 1's classes, and those day 2 brings
DAY1_SHARE = 0.6


def folder_name(label: int) -> str:
    return FASHION_MNIST_CLASSES[label].replace("/", "-")  # "T-shirt/top" would be two folders


def day_of(labels: np.ndarray) -> np.ndarray:
    """Each training image's day (1 or 2): the first 60 % of an old class's images (file order) on day 1."""
    day = np.full(len(labels), 2)
    for c in OLD:
        where = np.flatnonzero(labels == c)
        day[where[: round(DAY1_SHARE * len(where))]] = 1
    return day


def write_folders(out: Path) -> dict[str, Path]:
    """OUT/{day1,day2,test,test-day1}/<class>/<i>.png (once: a complete earlier write is kept)."""
    out = Path(out)
    names = ("day1", "day2", "test", "test-day1")
    if (out / ".complete").is_file():
        return {n: out / n for n in names}
    tmp = out.parent / f".{out.name}.partial"  # renamed when whole: an interrupted write is never taken for one
    shutil.rmtree(tmp, ignore_errors=True)
    (x, y), (xt, yt) = [tuple(read_idx(f) for f in find_idx_pair(BUNDLED, split)) for split in ("train", "test")]
    day = day_of(y)
    picks = {"day1": (x[day == 1], y[day == 1]), "day2": (x[day == 2], y[day == 2]), "test": (xt, yt),
             "test-day1": (xt[np.isin(yt, list(OLD))], yt[np.isin(yt, list(OLD))])}
    for name, (images, labels) in picks.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = tmp / name / folder_name(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{i:05d}.png")
    (tmp / ".complete").write_text(json.dumps({n: len(picks[n][1]) for n in names}) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {n: out / n for n in names}


def write_shards(folders: dict[str, Path], shards: Path) -> dict[str, Path]:
    """Each class folder written to shards with recog's writer, as a user does (once)."""
    done = {}
    for name, folder in folders.items():
        target = shards / name
        if not (target / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "recog.data", "write", "folder", str(folder), str(target)],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        done[name] = target
    return done


def train(run_dir: Path, overrides: list[str], fresh: bool = False) -> dict:
    """One 2-process train.py run: its metrics.json and wall seconds. A run directory that holds a finished run of
    the same overrides (an earlier bench run's) is read back instead, unless `fresh`; any other is replaced."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "train.py", "data=images",
           *overrides, f"hydra.run.dir={run_dir}"]
    done = run_dir / "bench-growth.json"  # written last: the command and what it measured
    if not fresh and done.is_file() and json.loads(done.read_text())["command"] == cmd[1:]:
        print("  (done before) " + " ".join(cmd[1:]), flush=True)
        return json.loads(done.read_text())["metrics"]
    shutil.rmtree(run_dir, ignore_errors=True)
    print("  $ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["seconds"] = time.perf_counter() - start
    metrics["images"] = metrics["step"] * metrics["global_batch"]
    metrics["log"] = [line for line in result.stdout.splitlines() if "weights " in line or "an epoch" in line]
    done.write_text(json.dumps({"command": cmd[1:], "metrics": metrics}))
    return metrics


def new_class_top1_at_start(shards: dict[str, Path], weights: Path, mix: float, seed: int, imprint: int) -> float:
    """The new classes' top-1 on the test split with the model (b) starts from, its first step's: built in this
    process (one rank) by recog's own build_data and build_recipe, with (b)'s data and weights= settings."""
    import torch

    from recog import dist
    from recog.build import build_data, build_recipe
    from recog.rundir import compose_train_config
    from recog.train import forward

    cfg = compose_train_config("data=images", f"data.train=[{shards['day1']},{shards['day2']}]",
                               f"data.mix=[{mix},1]", f"data.test={shards['test']}", f"weights={weights}",
                               f"imprint_images={imprint}", f"seed={seed}", "data.num_workers=0")
    torch.manual_seed(seed)
    ctx = dist.Dist(0, 0, 1, 1, torch.device("cpu"), None)
    data = build_data(cfg, ctx)
    recipe = build_recipe(cfg, ctx, data, data.start(1))
    new = torch.tensor([data.classes.index(FASHION_MNIST_CLASSES[c].replace("/", "-")) for c in NEW])
    right = seen = 0
    recipe.model.eval()
    with torch.no_grad():
        for _, labels, output in forward(recipe.model, data.test_loader, recipe.normalize, ctx.device):
            mine = torch.isin(labels, new)
            right += (output.logits.argmax(1)[mine] == labels[mine]).sum().item()
            seen += mine.sum().item()
    return right / seen


def one_seed(shards: dict[str, Path], work: Path, seed: int, mix: float, epochs: int, b_args: list[str],
             fresh: bool) -> dict:
    both = f"data.train=[{shards['day1']},{shards['day2']}]"
    a = train(work / f"a-{seed}", [both, f"data.test={shards['test']}", f"seed={seed}"], fresh)
    day1 = train(work / f"day1-{seed}", [f"data.train={shards['day1']}", f"data.test={shards['test-day1']}",
                                         f"seed={seed}"], fresh)
    weights = work / f"day1-{seed}" / "checkpoints" / "last.pt"
    b = train(work / f"b-{seed}", [both, f"data.mix=[{mix},1]", f"data.test={shards['test']}", f"weights={weights}",
                                   f"epochs={epochs}", f"seed={seed}", *b_args], fresh)
    starts = {name: new_class_top1_at_start(shards, weights, mix, seed, imprint)
              for name, imprint in (("imprinted", 32), ("fresh", 0))}
    return {"seed": seed, "a": a, "day1": day1, "b": b, "start": starts}


def report(results: list[dict], mix: float, epochs: int, b_args: list[str]) -> None:
    print("\n| seed | (a) top-1 | (a) images | (b) top-1 | (b) images | (b)-(a) | (b)/(a) images | "
          "new classes at (b)'s start: imprinted / fresh |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        a, b = r["a"], r["b"]
        print(f"| {r['seed']} | {a['top1']:.4f} | {a['images']:,} | {b['top1']:.4f} | {b['images']:,} | "
              f"{b['top1'] - a['top1']:+.4f} | {b['images'] / a['images']:.2f} | "
              f"{r['start']['imprinted']:.3f} / {r['start']['fresh']:.3f} |")
    gaps = [r["b"]["top1"] - r["a"]["top1"] for r in results]
    print(f"\n(b) = day 1's model continued {epochs} epochs on day 2 + {mix:g} of day 1 (data.mix=[{mix:g},1]"
          f"{' ' + ' '.join(b_args) if b_args else ''}); "
          f"(b)-(a) mean {statistics.mean(gaps):+.4f}, from {min(gaps):+.4f} to {max(gaps):+.4f} over seeds "
          f"{', '.join(str(r['seed']) for r in results)}; day 1's own run (7 classes) top-1 "
          + ", ".join(f"{r['day1']['top1']:.4f}" for r in results) + ".")
    for r in results:
        for line in r["b"]["log"]:
            print(f"  seed {r['seed']} (b): {line.split('] ', 1)[-1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    f = commands.add_parser("folders", help="write the two days (and the test splits) as class folders of PNGs")
    f.add_argument("out")
    r = commands.add_parser("run", help="(a), day 1 and (b) per seed, and the table")
    r.add_argument("--work", default=str(ROOT / "outputs" / "bench-growth"))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--mix", type=float, default=0.5, help="day 1's share of each epoch of (b) (0.5)")
    r.add_argument("--epochs", type=int, default=6, help="(b)'s epochs (6)")
    r.add_argument("--b-args", default="", help="more overrides for (b), e.g. 'optim.lr=3e-3'")
    r.add_argument("--fresh", action="store_true", help="train again the runs an earlier bench run finished")
    args = parser.parse_args(argv)
    if args.command == "folders":
        for name, folder in write_folders(Path(args.out)).items():
            print(f"{name}: {folder}")
        return 0
    work = Path(args.work)
    shards = write_shards(write_folders(work / "folders"), work / "shards")
    b_args = args.b_args.split()
    results = [one_seed(shards, work, seed, args.mix, args.epochs, b_args, args.fresh) for seed in args.seeds]
    report(results, args.mix, args.epochs, b_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
