"""Time to the first step: from launching the default job to its first optimizer step, recog against the same model
under PyTorch Lightning's Trainer, both launched the same way, rounds alternating in one run.

    python bench/startup.py --rounds 5
    python bench/startup.py --rounds 5 --csv /tmp/startup.csv

Each side is one `torchrun --standalone --nproc_per_node=2 ...` (a fresh launch per round: nothing is imported
beforehand), timed by this script from the launch to the line its rank 0 prints once every rank has taken its
first optimizer step; then the whole process tree (torchrun, the ranks, their data-loader workers) is killed.

- recog: `train.py log_every=1` (the default job; log_every=1 prints the progress line after step 1, whose
  figures are all-reduced over the ranks first), its run directory in a temporary folder. Also the time to its
  `config:` line (Hydra composed, recog.train imported, the process group up).
- Lightning: this script under torchrun (`--lightning-job`): the default job's model (conf/model/convnet.yaml:
  recog.model.RecognitionModel, channels_last), cross-entropy with label smoothing 0.1, AdamW at the default
  job's LR (0.006 x 128 / 256) stepped each step, and the bundled Fashion-MNIST subset as Lightning's docs
  have a custom data set: a torch Dataset over the images in memory (read from data/fashion-mnist-subset),
  torchvision transforms (shift by up to 4 px, flip 0.5) and `DataLoader(batch_size=64, shuffle=True,
  num_workers=1)` (recog's data.num_workers=auto on 2 cores and 2 ranks: 1 per rank), which Lightning shards
  over the ranks. `L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1)`, its defaults
  otherwise (its logger and checkpoints in a temporary folder, as recog writes TensorBoard); a Callback at the
  first batch's end waits for every rank, and rank 0 prints the line.

An untimed round of each side comes first (the page cache; recog writes its shards on first use). The rounds
alternate which side goes first. Prints each round, the medians, the spread (min-max) and recog / Lightning
(target <= 1.0: recog reaches its first step no later) with the load average.
"""

from __future__ import annotations

import argparse
import csv
import lzma
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_STEP = "first optimizer step done on every rank"  # the Lightning job's line


def torchrun(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "torchrun"  # the environment's, as the default job is launched
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node=2", *args]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): the ranks, their fork servers and data-loader workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launch and everything below it (a worker ignores SIGTERM; recog's ranks would checkpoint)."""
    for _ in range(3):  # again: a process may have forked meanwhile
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    process.wait()


def launch(command: list[str], marks: dict[str, str], timeout_s: float, root: Path = ROOT) -> dict[str, float]:
    """Seconds from the launch (in `root`, a checkout of recog) to the first output line containing each mark
    (the last mark: the first step)."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    seen: dict[str, float] = {}
    tail: list[str] = []
    try:
        for line in process.stdout:
            tail = (tail + [line])[-20:]
            for name, mark in marks.items():
                if name not in seen and mark in line:
                    seen[name] = time.perf_counter() - started
            if list(marks)[-1] in seen or time.perf_counter() - started > timeout_s:
                break
    finally:
        kill_tree(process)
    if list(marks)[-1] not in seen:
        raise SystemExit(f"error: {' '.join(command[-3:])} reached no first step; its last lines:\n"
                         + "".join(tail))
    return seen


def recog_side(run_root: Path, timeout_s: float, root: Path = ROOT):
    def one_round(r: int) -> dict[str, float]:
        run_dir = run_root / f"recog-{root.name}-{r}"
        return launch(torchrun("train.py", "log_every=1", f"hydra.run.dir={run_dir}"),
                      {"config": "INFO] config:", "step": "INFO] step 1/"}, timeout_s, root)

    return one_round


def lightning_side(run_root: Path, timeout_s: float):
    def one_round(r: int) -> dict[str, float]:
        return launch(torchrun(str(Path(__file__).resolve()), "--lightning-job", str(run_root / f"lightning-{r}")),
                      {"step": FIRST_STEP}, timeout_s)

    return one_round


def read_idx(path: Path):
    """An MNIST-format file (.xz) as a uint8 tensor."""
    import numpy as np
    import torch

    raw = lzma.decompress(path.read_bytes())
    dims = raw[3]  # the magic number's last byte
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape).copy())


def lightning_job(root_dir: str) -> None:
    """Run under torchrun: the default job's model under Lightning's Trainer, to its first optimizer step."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    from recog.model import RecognitionModel

    model_cfg = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/convnet.yaml"))["model"]
                 .items() if k != "_target_"}
    folder = ROOT / "data/fashion-mnist-subset"

    class FashionMNIST(Dataset):
        def __init__(self):
            self.images, self.labels = read_idx(folder / "train-images-idx3-ubyte.xz"), read_idx(
                folder / "train-labels-idx1-ubyte.xz")
            self.transform = v2.Compose([v2.RandomCrop(28, padding=4), v2.RandomHorizontalFlip(),
                                         v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.2852], [0.3528])])

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.transform(self.images[i][None]), int(self.labels[i])

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = RecognitionModel(num_classes=10, in_channels=1, **model_cfg).to(
                memory_format=torch.channels_last)

        def training_step(self, batch, batch_idx):
            images, labels = batch
            logits = self.model(images.contiguous(memory_format=torch.channels_last)).logits
            return F.cross_entropy(logits, labels, label_smoothing=0.1)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.006 * 128 / 256, weight_decay=0.05)

    class FirstStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                print(FIRST_STEP, flush=True)

    loader = DataLoader(FashionMNIST(), batch_size=64, shuffle=True, num_workers=1, drop_last=True)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, default_root_dir=root_dir,
                        callbacks=[FirstStep()])
    trainer.fit(Classifier(), loader)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a launch may take to its first step")
    p.add_argument("--csv", help="also write each round's figures here")
    p.add_argument("--baseline", type=Path, help="also time the default job of this other checkout of recog "
                   "(e.g. `git worktree add --detach /tmp/recog-main main`): before against after a change")
    p.add_argument("--lightning-job", metavar="DIR", help=argparse.SUPPRESS)  # run under torchrun, DIR: its outputs
    return p


def main() -> None:
    args = parser().parse_args()
    if args.lightning_job:
        return lightning_job(args.lightning_job)
    from _common import require, rounds

    require("lightning")
    with tempfile.TemporaryDirectory(prefix="recog-startup-") as tmp:
        sides = {"recog": recog_side(Path(tmp), args.timeout), "lightning": lightning_side(Path(tmp), args.timeout)}
        if args.baseline:
            sides["baseline"] = recog_side(Path(tmp), args.timeout, args.baseline.resolve())
        for side in sides.values():  # untimed: the page cache, recog's shards on first use
            side(-1)
        load_before = os.getloadavg()[0]
        figures = rounds(sides, args.rounds, progress=True)
        load_after = os.getloadavg()[0]
    report(args, figures, (load_before, load_after))


def report(args, figures: dict[str, list[dict[str, float]]], load: tuple[float, float]) -> None:
    from _common import header, row

    sides = list(figures)  # recog, lightning (, baseline)
    series = {f"{side} first step s": [f["step"] for f in figures[side]] for side in sides}
    series.update({f"{side} config line s": [f["config"] for f in figures[side]]
                   for side in sides if "config" in figures[side][0]})
    recog = series["recog first step s"]
    for side in sides[1:]:
        series[f"recog/{side}"] = [ours / theirs for ours, theirs in zip(recog, series[f"{side} first step s"])]
    print(f"torchrun --standalone --nproc_per_node=2, {args.rounds} rounds alternating; load average "
          f"{load[0]:.1f} before, {load[1]:.1f} after (1 minute); {os.cpu_count()} CPU(s)")
    columns = [("round", ">5"), *((name, f"  >{len(name)}.{3 if '/' in name else 2}f") for name in series)]
    print(header(columns))
    for r in range(args.rounds):
        print(row(columns, [r, *(values[r] for values in series.values())]))
    print()
    for name, values in series.items():
        print(f"{name:<26} median {statistics.median(values):6.3f}  min {min(values):6.3f}  max {max(values):6.3f}")
    print(f"target: recog/lightning <= 1.0 (median {statistics.median(series['recog/lightning']):.3f}), recog "
          f"< 10 s (median {statistics.median(recog):.2f} s)")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", *series])
            for r in range(args.rounds):
                writer.writerow([r, *(f"{values[r]:.3f}" for values in series.values())])


if __name__ == "__main__":
    main()
