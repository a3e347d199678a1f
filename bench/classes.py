"""A large classifier three ways, measured: replicated (inside DDP), sharded (recog.sharded, out of DDP), and
sharded with Partial FC's sampling; docs/classes.md's table on paper, here on CPU with gloo.

    torchrun --standalone --nproc_per_node=2 bench/classes.py                        # 10k, 100k, 1M classes
    torchrun --standalone --nproc_per_node=2 bench/classes.py --classes 10000 --steps 3 --rounds 2

Setup: a tiny backbone (recog.model's convnet at width 8, one conv block per stage, on synthetic 1x28x28 images),
a 128-wide L2-normalised embedding (docs/classes.md's table uses 512), uniform random labels over all classes
(new each step), --batch-size 64 images per rank, AdamW, fp32, gloo on CPU (CPU only, even where a GPU is: its
timings say nothing about NCCL). The three modes:

  replicated  RecognitionModel's way: the cosine classifier's rows (`class_weights`, C x D) are a parameter of the
              model, and RecognitionLoss's cross-entropy; model + loss (ModelWithLoss) inside DDP, so DDP
              all-reduces the whole C x D gradient each step
  sharded     recog.sharded.ShardedClassifier through ShardedLoss: C/W rows on each rank, kept out of DDP
              (keep_out_of_ddp); DDP carries the backbone alone
  sampled     sharded with sample_rate --sample-rate (0.1): each step scores the positives and a random tenth of
              each rank's rows

Each mode runs in fresh processes of its own (peak RSS only grows within a process): every torchrun rank starts
a child process (`--child MODE`) and the children form a new gloo group of their own; each reports its figures as
one JSON line. Modes run in an order that rotates round by round (--rounds), so drift on this shared machine hits
them alike; a figure is the median over rounds. Columns, per rank (the larger of the ranks'):

  classifier + AdamW   bytes of the classifier's tensors after the first step: its rows, their gradient, AdamW's
                       exp_avg and exp_avg_sq (and its step counter), numel x element_size of each
  peak RSS             the child's ru_maxrss (whole process: Python, torch, backbone, gloo); "+" is its growth over
                       the RSS just before the model and classifier were built (VmRSS); the tiny backbone is a
                       few KiB, so this is the classifier's: its rows (their `randn() * 0.01` start briefly holds
                       two copies), gradient, AdamW state, DDP's bucket copy of a replicated gradient, the
                       normalised rows, the logits and their gradient, and the allocator's slack
  DDP all-reduce       bytes DDP hands to all-reduce per step: a comm hook adds up each bucket's bytes, then does
                       DDP's default (default_hooks.allreduce_hook)
  own collectives      bytes the sharded classifier hands to torch.distributed per step (all_gather: the batch
                       sizes, the padded embeddings and labels; all_reduce: the max logit, the sums, the
                       embeddings' gradient): dist.all_reduce and dist.all_gather are wrapped during the step and
                       count the numel x element_size of the tensor each call sends; DDP's own bytes subtracted
  step                 median over --steps timed steps after --warmup untimed ones of the slowest rank's step
                       (forward, backward, AdamW step, zero_grad), then the median over rounds
Bytes handed to a collective are not bytes on the wire: a ring all-reduce sends 2(W-1)/W of them per rank, an
all-gather (W-1) x. A mode that fails (MemoryError, an allocator error, a killed process, --child-timeout) gets
its reason in the table instead of figures; the others still run. Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from _common import markdown_table
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from recog import dist
from recog.loss import ModelWithLoss, RecognitionLoss
from recog.model import Output, convnet
from recog.sharded import ShardedClassifier, ShardedLoss, keep_out_of_ddp

MODES = ("replicated", "sharded", "sampled")
MiB = 2**20
COUNTED = {"all_reduce": (0, "tensor"), "all_gather": (1, "tensor")}  # function: where its input tensor is


class TinyModel(nn.Module):
    """RecognitionModel's shape (backbone, embedding head, cosine classifier rows `class_weights`) with a tiny
    backbone, so that the classifier dominates. num_classes None: no rows (a sharded classifier holds them)."""

    def __init__(self, num_classes: int | None, embedding_dim: int, logit_scale: float = 16.0):
        super().__init__()
        self.backbone, features = convnet(1, width=8, blocks=(1, 1, 1))
        self.embed = nn.Linear(features, embedding_dim)
        self.class_weights = (nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
                              if num_classes else None)
        self.logit_scale = logit_scale

    def forward(self, images: torch.Tensor) -> Output:
        embeddings = F.normalize(self.embed(self.backbone(images)), dim=1)
        if self.class_weights is None:
            return Output(embeddings, embeddings.new_zeros((len(embeddings), 0)))
        return Output(embeddings, self.logit_scale * embeddings @ F.normalize(self.class_weights, dim=1).t())


class Counts:
    """Bytes handed to each collective during the counted steps."""

    def __init__(self):
        self.ddp = 0
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.ddp, self.calls = 0, {}


def counting_allreduce(counts: Counts, bucket):
    """DDP's default all-reduce, its bucket's bytes counted first."""
    counts.ddp += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


@contextmanager
def counting_collectives(counts: Counts):
    """torch.distributed's all_reduce and all_gather, each call adding its input's bytes to counts.calls."""
    real = {name: getattr(tdist, name) for name in COUNTED}

    def wrap(name):
        index, key = COUNTED[name]

        def counted(*args, **kwargs):
            t = args[index] if len(args) > index else kwargs[key]
            counts.calls[name] = counts.calls.get(name, 0) + t.numel() * t.element_size()
            return real[name](*args, **kwargs)
        return counted

    for name in COUNTED:
        setattr(tdist, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(tdist, name, fn)


def vm(field: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def classifier_bytes(rows: nn.Parameter, optimizer: torch.optim.Optimizer) -> int:
    """The rows, their gradient and every tensor of their AdamW state (exp_avg, exp_avg_sq, step)."""
    state = optimizer.state.get(rows, {})
    return tensor_bytes(rows) + tensor_bytes(rows.grad) + sum(tensor_bytes(v) for v in state.values()
                                                              if isinstance(v, torch.Tensor))


def measure(args, rank: int, world_size: int) -> dict:
    """One mode's figures on this rank (the process group is up)."""
    torch.manual_seed(0)
    replicated = args.child == "replicated"
    rss_before = vm("VmRSS")  # before any rows exist: replicated's are the model's own
    model = TinyModel(args.num_classes if replicated else None, args.dim)
    if replicated:
        loss, rows = RecognitionLoss(), model.class_weights
    else:
        rate = args.sample_rate if args.child == "sampled" else 1.0
        classifier = ShardedClassifier(args.num_classes, args.dim, rank, world_size, sample_rate=rate)
        loss, rows = ShardedLoss(classifier), classifier.weight
    trained = ModelWithLoss(model, loss)
    if not replicated:
        keep_out_of_ddp(trained)
    ddp = DDP(trained)
    counts = Counts()
    ddp.register_comm_hook(counts, counting_allreduce)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(1000 + rank)
    images = torch.randn(args.batch_size, 1, 28, 28, generator=g)
    times, held, ddp_bytes, own = [], 0, 0, {}
    for step in range(args.warmup + args.steps):
        labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
        tdist.all_reduce(torch.zeros(1))  # start together
        counts.reset()
        start = time.perf_counter()
        with counting_collectives(counts):
            ddp(images, labels)["total"].backward()
            optimizer.step()
        if step == 0:
            held = classifier_bytes(rows, optimizer)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        ddp_bytes = counts.ddp
        own = {name: n for name, n in counts.calls.items()}
        own["all_reduce"] = own.get("all_reduce", 0) - counts.ddp  # the hook's all-reduce went through the wrapper
    slowest = torch.tensor(times[args.warmup:], dtype=torch.float64)
    tdist.all_reduce(slowest, op=tdist.ReduceOp.MAX)
    return {"classifier_bytes": held, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before": rss_before, "hwm": vm("VmHWM"), "ddp_bytes": ddp_bytes,
            "own_bytes": {k: v for k, v in own.items() if v}, "step_s": statistics.median(slowest.tolist())}


def child(args) -> None:
    """One rank of one mode, in a process of its own: print its figures (or why it failed) as one JSON line."""
    tdist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world_size,
                             timeout=timedelta(seconds=args.child_timeout))
    try:
        result = measure(args, args.rank, args.world_size)
    except (MemoryError, RuntimeError) as error:  # torch's allocator raises RuntimeError("... can't allocate ...")
        result = {"failed": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:100]}"}
    print(json.dumps(result), flush=True)
    tdist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_child(args, ctx, mode: str, classes: int) -> dict:
    """Start this rank's process for one mode and wait for its figures; every rank calls it together."""
    port = [free_port() if ctx.rank == 0 else None]
    tdist.broadcast_object_list(port, src=0)
    init = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{port[0]}"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--num-classes", str(classes),
               "--rank", str(ctx.rank), "--world-size", str(ctx.world_size), "--init", init,
               "--child-timeout", str(args.child_timeout)] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                                             ("dim", "batch_size", "sample_rate", "steps", "warmup")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"over --child-timeout {args.child_timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1][:100]
        killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
        return {"failed": f"exit {done.returncode}{killed}: {why}"}
    return json.loads(lines[-1])


def size(n: float) -> str:
    """Bytes in KiB, MiB or GiB, three figures or so."""
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale or unit == "KiB":
            value = n / scale
            return f"{value:,.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"


def table(results: dict, sample_rate: float) -> list[str]:
    """results[(classes, mode)]: a list (over rounds) of a list (over ranks) of each child's figures."""
    rows = []
    for (classes, mode), per_round in results.items():
        failed = [r["failed"] for ranks in per_round for r in ranks if "failed" in r]
        label = mode if mode != "sampled" else f"sampled {sample_rate}"
        if failed:
            rows.append([f"{classes:,}", label, "failed: " + failed[0], "", "", "", "", ""])
            continue
        last = per_round[-1]
        step = statistics.median(ranks[0]["step_s"] for ranks in per_round)  # each is the slowest rank's already
        base = results.get((classes, "replicated"))
        base_ok = base and not any("failed" in r for ranks in base for r in ranks)
        ratio = f"{step / statistics.median(rk[0]['step_s'] for rk in base):.2f}" if base_ok else "-"
        own = max((r["own_bytes"] for r in last), key=lambda o: sum(o.values()))
        own_text = ", ".join(f"{k} {size(v)}" for k, v in sorted(own.items())) or "-"
        peak, grown = max(r["peak_rss"] for r in last), max(r["peak_rss"] - r["rss_before"] for r in last)
        rows.append([f"{classes:,}", label, size(max(r["classifier_bytes"] for r in last)),
                     f"{size(peak)} (+{size(grown)})",
                     size(max(r["ddp_bytes"] for r in last)), own_text, f"{step * 1e3:,.0f}", ratio])
    titles = ["classes", "mode", "classifier + AdamW per rank", "peak RSS per rank (+ from the model on)",
              "DDP all-reduce per step", "own collectives per step", "step ms", "step / replicated"]
    return markdown_table(titles, rows, "rlrrrlrr")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dim", type=int, default=128, help="embedding width (docs/classes.md's table: 512)")
    p.add_argument("--batch-size", type=int, default=64, help="images per rank")
    p.add_argument("--sample-rate", type=float, default=0.1, help="the sampled mode's loss sample_rate")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1, help="each mode once per round, in rotating order")
    p.add_argument("--child-timeout", type=int, default=900, help="seconds one mode may take")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # the rest: a child's own arguments
    p.add_argument("--num-classes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.child:
        return child(args)
    ctx = dist.setup("gloo")
    results: dict = {}
    for classes in args.classes:
        for r in range(args.rounds):
            shift = r % len(args.modes)
            for mode in args.modes[shift:] + args.modes[:shift]:
                mine = run_child(args, ctx, mode, classes)
                ranks = dist.all_gather_object(mine)
                results.setdefault((classes, mode), []).append(ranks)
                if ctx.is_main:
                    shown = ranks[0].get("failed") or f"{ranks[0]['step_s'] * 1e3:,.0f} ms/step"
                    print(f"{classes:,} classes, {mode}, round {r + 1}/{args.rounds}: {shown}", flush=True)
    if ctx.is_main:
        ordered = {(c, m): results[(c, m)] for c in args.classes for m in args.modes}
        print(f"\n{ctx.world_size} ranks, gloo, embedding_dim {args.dim}, {args.batch_size} images per rank, AdamW, "
              f"{args.steps} timed steps after {args.warmup}, {args.rounds} round(s), "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
              f"{os.getloadavg()[0]:.1f} at the end")
        print("\n".join(table(ordered, args.sample_rate)))
    dist.teardown()


if __name__ == "__main__":
    main()
