"""recog's training step against a bare hand-written DDP loop: same model, batch and in-memory data.

    torchrun --standalone --nproc_per_node=2 bench/overhead.py   # 2 processes (gloo on CPU, NCCL on GPU)
    python bench/overhead.py                                      # 1 process

Both loops run in the same processes, alternating round by round (this machine
is shared and noisy: side by side, drift hits both alike). recog's loop is the
real `recog.train.train_one_epoch` (LR schedule, loss bookkeeping, periodic
all-reduced logging); the bare loop is forward, cross-entropy, backward, step.
Prints images/s of each and the ratio recog / bare (target >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR

from recog import dist, parallel
from recog.data.stream import Batch, Normalize
from recog.log import NullWriter
from recog.loss import RecognitionLoss
from recog.model import RecognitionModel
from recog.preempt import StopOnSignal
from recog.train import Checkpoints, StepRecipe, train_one_epoch, warmup_cosine


def make_model(ctx, args):
    torch.manual_seed(0)
    model = RecognitionModel(args.backbone, num_classes=10, in_channels=1, width=args.width,
                             small_input=args.backbone != "convnet").to(ctx.device)
    ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if ctx.is_distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return ddp, optimizer


def bare_epoch(model, batches, optimizer):
    for images, labels, *_ in batches:
        device = model_device(model)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images = (images.float() / 255 - 0.286) / 0.353
        loss = F.cross_entropy(model(images).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def model_device(model):
    return next(model.parameters()).device


def timed(fn, ctx) -> float:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dist.all_reduce_sum(torch.zeros(1, device=ctx.device))  # start together
    start = time.perf_counter()
    fn()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return dist.all_reduce_max(torch.tensor([time.perf_counter() - start], device=ctx.device)).item()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256, help="per process (the default job uses 256)")
    p.add_argument("--steps", type=int, default=30, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=6)
    return p


def measure(ctx, args) -> tuple[list[float], list[float]]:
    """Global images/s of the bare loop and of recog's loop, per round (rounds alternate which goes first)."""
    g = torch.Generator().manual_seed(ctx.rank)
    batches = [Batch(torch.randint(0, 256, (args.batch_size, 1, 28, 28), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (args.batch_size,), generator=g), 0) for _ in range(args.steps)]
    images_per_round = args.steps * args.batch_size * ctx.world_size

    bare_model, bare_opt = make_model(ctx, args)
    recog_model, recog_opt = make_model(ctx, args)
    scheduler = LambdaLR(recog_opt, partial(warmup_cosine, warmup_steps=10, total_steps=10**9))
    loss_fn, writer, normalize = RecognitionLoss(), NullWriter(), Normalize([0.286], [0.353], ctx.device)
    # the default job's settings: fp32, no accumulation, checkpoints only at the end of an epoch, and the
    # per-step stop-flag exchange
    cfg = OmegaConf.create({"perf": {"precision": "fp32"}, "checkpoint": {"keep": 1, "every_steps": 0,
                                                                          "every_minutes": 0}})
    scaler = parallel.grad_scaler(cfg, ctx.device)
    recipe = StepRecipe(recog_model, normalize, loss_fn, recog_opt, scheduler, scaler,
                        partial(parallel.autocast, cfg, ctx.device))
    checkpoints = Checkpoints(cfg, ctx, Path("unused"), recog_model, recog_opt, scheduler, scaler, 10**9, {})
    stop = StopOnSignal(dist.AnyRankFlag())  # the per-step stop-flag exchange, no handlers

    def run_recog():
        train_one_epoch(recipe, batches, ctx, writer, 0, log_every=10, epoch=0, consumed=[0],
                        batches_per_epoch=10**9, checkpoints=checkpoints, stop=stop)

    def run_bare():
        bare_epoch(bare_model, batches, bare_opt)

    run_bare(), run_recog()  # warm-up: allocator, DDP buckets, thread pools
    bare, ours = [], []
    for i in range(args.rounds):  # alternate which goes first, so neither always runs on a warmer machine
        for name, fn, times in ((("bare", run_bare, bare), ("recog", run_recog, ours))[:: 1 if i % 2 == 0 else -1]):
            times.append(images_per_round / timed(fn, ctx))
    stop.finish()
    return bare, ours


def main() -> None:
    args = parser().parse_args()
    ctx = dist.setup()
    bare, ours = measure(ctx, args)
    if ctx.is_main:
        print(f"{args.backbone} batch {args.batch_size}/process x {ctx.world_size} process(es) on {ctx.device}, "
              f"{args.steps} steps per round, {args.rounds} rounds")
        print(f"{'round':>5} {'bare img/s':>11} {'recog img/s':>12} {'ratio':>6}")
        for i, (b, r) in enumerate(zip(bare, ours)):
            print(f"{i:>5} {b:>11.0f} {r:>12.0f} {r / b:>6.3f}")
        b, r = statistics.median(bare), statistics.median(ours)
        print(f"median: bare {b:.0f} img/s, recog {r:.0f} img/s, ratio recog/bare = {r / b:.3f} (target >= 0.95)")
    dist.teardown()


if __name__ == "__main__":
    main()
