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
import time
from functools import partial

import torch
import torch.nn.functional as F
from _common import header, medians, rounds, row, sync
from torch.nn.parallel import DistributedDataParallel as DDP

from recog import dist
from recog.data.loader import Batch
from recog.data.normalize import Normalize
from recog.data.position import Position
from recog.log import NullWriter
from recog.loss import ModelWithLoss, RecognitionLoss
from recog.model import RecognitionModel
from recog.preempt import StopOnSignal
from recog.step import StepRecipe, warmup_cosine
from recog.train import StepLog, train_one_epoch


def make_model(ctx, args, loss_fn=None):
    """The model (with `loss_fn`: model and loss as one module, as recog trains them), DDP-wrapped when
    distributed, and its optimizer."""
    torch.manual_seed(0)
    model = RecognitionModel(args.backbone, num_classes=10, in_channels=1, width=args.width,
                             small_input=args.backbone != "convnet").to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    trained = ModelWithLoss(model, loss_fn) if loss_fn is not None else model
    ddp = DDP(trained, device_ids=device_ids) if ctx.is_distributed else trained
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3, weight_decay=0.05)  # the convnet's default
    return ddp, optimizer


def bare_epoch(model, batches, optimizer, memory_format):
    for images, labels, *_ in batches:
        device = model_device(model)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images = ((images.float() / 255 - 0.286) / 0.353).contiguous(memory_format=memory_format)
        loss = F.cross_entropy(model(images).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def model_device(model):
    return next(model.parameters()).device


def slowest_seconds(fn, ctx) -> float:
    """fn's wall seconds on the slowest rank, all ranks started together."""
    sync(ctx.device)
    dist.all_reduce_sum(torch.zeros(1, device=ctx.device))  # start together
    start = time.perf_counter()
    fn()
    sync(ctx.device)
    return dist.all_reduce_max(torch.tensor([time.perf_counter() - start], device=ctx.device)).item()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="per process (the default job's)")
    p.add_argument("--contiguous", dest="channels_last", action="store_false",
                   help="NCHW model and batches (the default job, perf.channels_last=true, uses NHWC)")
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
    loss_fn = RecognitionLoss()
    recog_trained, recog_opt = make_model(ctx, args, loss_fn)
    recog_model = getattr(recog_trained, "module", recog_trained).model
    # the default job's settings: fp32, no accumulation, warmup + cosine, scalars every 10 steps, no checkpoint
    # within the epoch, and the per-step stop-flag exchange (no signal handlers installed)
    recipe = StepRecipe(recog_model, recog_opt, loss_fn, Normalize([0.286], [0.353], ctx.device), device=ctx.device,
                        channels_last=args.channels_last, trained=recog_trained,
                        lr_factor=partial(warmup_cosine, warmup_steps=10, total_steps=10**9))
    stop = StopOnSignal(dist.AnyRankFlag())

    def run_recog():
        train_one_epoch(recipe, batches, Position(batches_per_epoch=10**9), StepLog(NullWriter(), every=10),
                        after_step=lambda position: stop.agreed())

    def run_bare():
        bare_epoch(bare_model, batches, bare_opt,
                   torch.channels_last if args.channels_last else torch.contiguous_format)

    run_bare(), run_recog()  # warm-up: allocator, DDP buckets, thread pools
    # rounds alternate which goes first, so that neither always runs on a warmer machine
    rates = rounds({"bare": lambda _: images_per_round / slowest_seconds(run_bare, ctx),
                    "recog": lambda _: images_per_round / slowest_seconds(run_recog, ctx)}, args.rounds)
    stop.finish()
    return rates["bare"], rates["recog"]


def main() -> None:
    args = parser().parse_args()
    ctx = dist.setup()
    bare, ours = measure(ctx, args)
    if ctx.is_main:
        print(f"{args.backbone} width {args.width}, {'channels_last' if args.channels_last else 'NCHW'}, "
              f"batch {args.batch_size}/process x {ctx.world_size} process(es) on {ctx.device}, "
              f"{args.steps} steps per round, {args.rounds} rounds")
        columns = [("round", ">5"), ("bare img/s", ">11.0f"), ("recog img/s", ">12.0f"), ("ratio", ">6.3f")]
        print(header(columns))
        for i, (b, r) in enumerate(zip(bare, ours)):
            print(row(columns, [i, b, r, r / b]))
        b, r = medians({"bare": bare, "recog": ours}).values()
        print(f"median: bare {b:.0f} img/s, recog {r:.0f} img/s, ratio recog/bare = {r / b:.3f} (target >= 0.95)")
    dist.teardown()


if __name__ == "__main__":
    main()
