"""recog's training step against PyTorch Lightning's Trainer and Hugging Face Accelerate: the same model, data in
memory, per-process batch and processes, rounds alternating in one run.

    torchrun --standalone --nproc_per_node=2 bench/trainers.py --rounds 5
    torchrun --standalone --nproc_per_node=2 bench/trainers.py --rounds 5 --csv /tmp/trainers.csv
    torchrun --standalone --nproc_per_node=2 bench/trainers.py --steps 100 --warmup 10 model.width=4 batch_size=8

(the last: a tiny model and batch, so that what each trainer does around the model is magnified; any train.py
override works there.)

All three train what the default job trains (conf/ composed as train.py composes it): the width-32 convnet in
channels_last, fp32, cross-entropy with label smoothing 0.1, AdamW at the peak LR scaled to the global batch,
linear warm-up then cosine, stepped every optimizer step, 64 images per process. The images are random 1x28x28
uint8 (Fashion-MNIST's shape: speed does not depend on the pixels), held in one in-memory TensorDataset that each
side reads through a DataLoader without workers, each rank its share, and normalises in the training process.

- recog: the real `recog.train.train_one_epoch` on the recipe train.py builds (model + loss as one DDP module,
  the scheduler, loss bookkeeping, scalars all-reduced every log_every steps, the per-step stop-flag exchange),
  its batches from a DistributedSampler; one epoch per round.
- Lightning: a LightningModule (training_step returns the loss; configure_optimizers the optimizer and a
  per-step LambdaLR) and `L.Trainer(accelerator="cpu", strategy="ddp", devices=2)` with logger, checkpointing,
  progress bar and model summary off; a fresh Trainer and one `fit` per round (the DistributedSampler is
  Lightning's own). Under torchrun it finds torchrun's variables (TorchElasticEnvironment) and the process group
  recog's `dist.setup` made.
- Accelerate: `Accelerator()`, `accelerator.prepare(model, optimizer, dataloader, scheduler)`,
  `accelerator.backward(loss)`, as its quick tour has it; prepared once, one epoch per round. On CPU it takes
  `Accelerator(cpu=True)`, what `accelerate launch --cpu` sets: without it, under torchrun on a machine without
  a GPU, every process trains alone. A prepared scheduler steps once per process at each optimizer step, so its
  warm-up and length are counted in those.

Each round every side takes --warmup untimed steps, then --steps timed ones: every rank starts the clock together
before the first timed step and stops it after the last; a round's figure is the global images/s over the
slowest rank's seconds. Rounds rotate which side goes first (this machine is shared and noisy: side by side,
drift hits all alike), after one untimed round each. Lightning's fit() also costs seconds before its first step
and after its last (its setup: DDP wrapping, the sampler, hooks; its teardown): printed apart, not in images/s.
Also the CPU time per step (all threads of a process), which other processes on a busy machine disturb far less
than the wall clock. Prints each round, the medians and the ratio recog / each peer (target >= 1.0).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from _common import header, medians, require, rounds, row, sync
from hydra.utils import instantiate
from identify import train_config
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from recog import dist, parallel
from recog.build import build_loss, parameter_groups
from recog.data.loader import Batch
from recog.data.normalize import Normalize
from recog.data.position import Position
from recog.log import NullWriter
from recog.preempt import StopOnSignal
from recog.step import StepRecipe, warmup_cosine
from recog.train import StepLog, train_one_epoch

MEAN, STD = [0.286], [0.353]  # Fashion-MNIST's, as recog's manifest records them
CLASSES = 10
SIDES = ("recog", "lightning", "accelerate")
PEERS = SIDES[1:]
EVERY_STEP = "recog-every-step"  # --every-step: recog with its stop flag posted every step


@dataclass
class Job:
    """What every side trains and reads, the same for all."""

    cfg: DictConfig  # the default job's config
    ctx: dist.Dist
    data: TensorDataset  # every rank's batches of a round: world size x (warmup + steps) x batch samples
    warmup: int  # untimed steps at the start of each round
    steps: int  # timed steps

    @property
    def lr(self) -> float:  # the peak LR scaled to the global batch, as build_recipe scales it
        return self.cfg.optim.lr * self.cfg.batch_size * self.ctx.world_size / self.cfg.optim.reference_batch

    def lr_factor(self, per_step: int = 1) -> Callable[[int], float]:
        """The LR schedule: warm-up over the first round's warm-up steps, then a cosine far longer than the run
        (about flat: a round is a slice of a long run). per_step: scheduler steps per optimizer step."""
        return partial(warmup_cosine, warmup_steps=self.warmup * per_step, total_steps=10**6 * per_step)

    def model(self) -> torch.nn.Module:
        """The default model, built and prepared (channels_last) as build_recipe does, the same weights on each side."""
        torch.manual_seed(self.cfg.seed)
        model = instantiate(self.cfg.model, num_classes=CLASSES, in_channels=1)
        return parallel.prepare_model(model, self.cfg.perf, self.ctx.is_distributed).to(self.ctx.device)

    def optimizer(self, params) -> torch.optim.Optimizer:
        return instantiate(self.cfg.optim.optimizer)(params, lr=self.lr)

    def loader(self) -> DataLoader:
        """The in-memory images as each peer's documentation has it: a DataLoader the trainer shards across ranks."""
        return DataLoader(self.data, batch_size=self.cfg.batch_size, shuffle=True, drop_last=True)

    @property
    def images_per_round(self) -> int:
        return self.steps * self.cfg.batch_size * self.ctx.world_size


class StepClock:
    """The seconds of a round's timed steps on the slowest rank: every rank starts the clock together before
    the first timed step and stops it after its last step. Also the CPU time the processes spent meanwhile (all
    their threads; a process waiting for its peer or for a core spends none), which other processes on a busy
    machine disturb far less than the wall clock."""

    def __init__(self, job: Job):
        self.job, self.device = job, job.ctx.device
        self.started = self.stopped = self.cpu_started = self.cpu_stopped = 0.0
        self.cpu_ms_per_step: list[float] = []  # each round's, the mean over ranks

    def start(self) -> None:
        sync(self.device)
        dist.all_reduce_sum(torch.zeros(1, device=self.device))  # start together
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        sync(self.device)
        self.stopped, self.cpu_stopped = time.perf_counter(), time.process_time()

    def images_per_s(self) -> float:
        """The round's global images/s; notes its CPU milliseconds per step."""
        seconds = dist.all_reduce_max(torch.tensor([self.stopped - self.started], device=self.device)).item()
        cpu = dist.all_reduce_sum(torch.tensor([self.cpu_stopped - self.cpu_started], device=self.device)).item()
        self.cpu_ms_per_step.append(cpu / self.job.ctx.world_size / self.job.steps * 1000)
        return self.job.images_per_round / seconds

    def around(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """The batches of a loop that asks for each next batch after its step: the clock starts when the first
        timed batch is handed over, and stops when the loop asks for one after the last."""
        for i, batch in enumerate(batches):
            if i == self.job.warmup:
                self.start()
            yield batch
        self.stop()


def recog_side(job: Job, clock: StepClock, flag_seconds: float = dist.FLAG_SECONDS) -> Callable[[int], float]:
    """recog's step as train.py takes it: what build_recipe builds, distribute(), train_one_epoch. flag_seconds:
    how often the ranks post their stop flags (train.py's: dist.FLAG_SECONDS; 0: every step, as before)."""
    cfg, ctx = job.cfg, job.ctx
    model, loss_fn = job.model(), build_loss(cfg, CLASSES).to(ctx.device)
    optimizer = job.optimizer(parameter_groups(model, loss_fn, job.lr))
    recipe = StepRecipe(model, optimizer, loss_fn, Normalize(MEAN, STD, ctx.device),
                        LambdaLR(optimizer, job.lr_factor()), parallel.grad_scaler(cfg.perf.precision, ctx.device),
                        partial(parallel.autocast, cfg.perf.precision, ctx.device), cfg.perf.channels_last,
                        ctx.device, job.lr, job.lr_factor(), cfg.batch_size * ctx.world_size * cfg.accumulate)
    recipe.distribute(ctx, cfg.perf, cfg.ddp)
    sampler = DistributedSampler(job.data, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(job.data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=lambda samples: Batch(*map(torch.stack, zip(*samples)), skipped=0))
    stop = StopOnSignal(dist.AnyRankFlag(flag_seconds))  # train.py's agreed stop flag (no handlers here)
    log_steps = StepLog(NullWriter(), every=cfg.log_every)  # rank 0 would write to TensorBoard: the same reduce

    def one_round(r: int) -> float:
        sampler.set_epoch(r)
        train_one_epoch(recipe, clock.around(loader), Position(batches_per_epoch=len(loader)), log_steps,
                        after_step=lambda position: stop.agreed())
        stop.finish()
        return clock.images_per_s()

    return one_round


def lightning_side(job: Job, clock: StepClock, fixed_s: list[float]) -> Callable[[int], float]:
    """A LightningModule and a fresh `L.Trainer(strategy="ddp")` per round; fixed_s gets each round's seconds
    outside the steps (making the Trainer and fit's setup before the first step, its teardown after the last),
    on the slowest rank."""
    import lightning as L

    cfg, ctx = job.cfg, job.ctx
    memory_format = torch.channels_last if cfg.perf.channels_last else torch.contiguous_format

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = job.model()
            self.normalize = Normalize(MEAN, STD, ctx.device)

        def training_step(self, batch, batch_idx):
            images, labels = batch
            images = self.normalize(images).contiguous(memory_format=memory_format)
            return F.cross_entropy(self.model(images).logits, labels, label_smoothing=cfg.loss.label_smoothing)

        def configure_optimizers(self):
            optimizer = job.optimizer(self.parameters())
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": LambdaLR(optimizer, job.lr_factor()), "interval": "step"}}

    class Clock(L.Callback):
        first_step = 0.0  # when the fit's first step began

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.first_step = time.perf_counter()
            if batch_idx == job.warmup:
                clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == job.warmup + job.steps - 1:
                clock.stop()

    module, loader = Classifier(), job.loader()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its banner at every Trainer
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in memory: no workers needed

    def one_round(r: int) -> float:
        called, callback = time.perf_counter(), Clock()
        trainer = L.Trainer(accelerator="gpu" if ctx.device.type == "cuda" else "cpu", strategy="ddp",
                            devices=ctx.local_world_size, num_nodes=ctx.world_size // ctx.local_world_size,
                            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback])
        trainer.fit(module, loader)
        outside = (callback.first_step - called) + (time.perf_counter() - clock.stopped)
        fixed_s.append(dist.all_reduce_max(torch.tensor([outside], device=ctx.device)).item())
        return clock.images_per_s()

    return one_round


def accelerate_side(job: Job, clock: StepClock) -> Callable[[int], float]:
    """Accelerate's quick tour: Accelerator(), prepare(model, optimizer, dataloader, scheduler), backward."""
    from accelerate import Accelerator

    cfg = job.cfg
    memory_format = torch.channels_last if cfg.perf.channels_last else torch.contiguous_format
    # On a machine without a GPU, Accelerator() under torchrun trains each process alone (no DDP, every rank the
    # whole data set): multi-CPU takes cpu=True, which `accelerate launch --cpu` passes as ACCELERATE_USE_CPU.
    accelerator = Accelerator(cpu=job.ctx.device.type == "cpu")
    if accelerator.num_processes != job.ctx.world_size:
        raise SystemExit(f"error: Accelerate sees {accelerator.num_processes} process(es), torchrun started "
                         f"{job.ctx.world_size}")
    model = job.model()
    optimizer = job.optimizer(model.parameters())
    scheduler = LambdaLR(optimizer, job.lr_factor(per_step=accelerator.num_processes))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, job.loader(), scheduler)
    normalize = Normalize(MEAN, STD, accelerator.device)

    def one_round(r: int) -> float:
        model.train()
        for images, labels in clock.around(loader):
            images = normalize(images).contiguous(memory_format=memory_format)
            loss = F.cross_entropy(model(images).logits, labels, label_smoothing=cfg.loss.label_smoothing)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        return clock.images_per_s()

    return one_round


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps per side and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them, each round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--csv", help="also write each round's figures here")
    p.add_argument("--every-step", action="store_true",
                   help="a fourth side: recog posting its stop flag every step (dist.AnyRankFlag(seconds=0))")
    p.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model.width=16 batch_size=128")
    return p


def main() -> None:
    args = parser().parse_args()
    require("lightning", "accelerate")
    cfg = train_config(*args.overrides)
    ctx = dist.setup()
    samples = ctx.world_size * (args.warmup + args.steps) * cfg.batch_size
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 256, (samples, 1, 28, 28), dtype=torch.uint8, generator=g),
                         torch.randint(0, CLASSES, (samples,), generator=g))
    job = Job(cfg, ctx, data, args.warmup, args.steps)
    names = (*SIDES, EVERY_STEP) if args.every_step else SIDES
    clocks, fixed_s = {side: StepClock(job) for side in names}, []
    sides = {"recog": recog_side(job, clocks["recog"]), "lightning": lightning_side(job, clocks["lightning"], fixed_s),
             "accelerate": accelerate_side(job, clocks["accelerate"])}
    if args.every_step:
        sides[EVERY_STEP] = recog_side(job, clocks[EVERY_STEP], flag_seconds=0)
    for side in sides.values():  # an untimed round each: first calls, allocator, DDP's buckets
        side(-1)
    for clock in clocks.values():
        clock.cpu_ms_per_step.clear()
    fixed_s.clear()
    load_before = os.getloadavg()[0]  # how busy the machine is: these two processes count about 2
    figures = rounds(sides, args.rounds, progress=ctx.is_main)
    if ctx.is_main:
        report(args, job, figures, {s: c.cpu_ms_per_step for s, c in clocks.items()}, fixed_s,
               (load_before, os.getloadavg()[0]))
    dist.teardown()


def report(args, job: Job, figures: dict[str, list[float]], cpu_ms: dict[str, list[float]], fixed_s: list[float],
           load: tuple[float, float]) -> None:
    cfg, ctx = job.cfg, job.ctx
    sides, peers = list(figures), list(figures)[1:]
    print(f"{cfg.model.backbone} width {cfg.model.width}, {'channels_last' if cfg.perf.channels_last else 'NCHW'}, "
          f"{cfg.perf.precision}, batch {cfg.batch_size}/process x {ctx.world_size} process(es) on {ctx.device} "
          f"({torch.get_num_threads()} thread(s) each), {args.warmup} + {args.steps} steps per side and round, "
          f"{args.rounds} rounds; load average {load[0]:.1f} before, {load[1]:.1f} after (1 minute)")
    columns = [("round", ">5"), *((f"{side} img/s", f"  >{len(side) + 6}.0f") for side in sides),
               *((f"{side} CPU ms/step", f"  >{len(side) + 13}.1f") for side in sides),
               ("Lightning outside steps s", "  >25.2f")]
    print(header(columns))
    for r in range(args.rounds):
        print(row(columns, [r, *(figures[side][r] for side in sides), *(cpu_ms[side][r] for side in sides),
                            fixed_s[r]]))
    ratios = {peer: [ours / theirs for ours, theirs in zip(figures["recog"], figures[peer])] for peer in peers}
    rate, rate_ratio, cpu = medians(figures), medians(ratios), medians(cpu_ms)
    print()
    columns = [("side", "<10"), ("img/s", " >6.0f"), ("recog/side", " >10.3f"), ("same round", " >10.3f"),
               ("CPU ms/step", " >11.1f"), ("side/recog", " >10.3f")]
    print("medians over the rounds; recog/side: of the images/s medians; same round: the median of each round's "
          "ratio; side/recog: of the CPU ms per step (>= 1: recog spends less)")
    print(header(columns))
    print(row(columns, ["recog", rate["recog"], "", "", cpu["recog"], ""]))
    for peer in peers:
        print(row(columns, [peer, rate[peer], rate["recog"] / rate[peer], rate_ratio[peer], cpu[peer],
                            cpu[peer] / cpu["recog"]]))
    fixed = medians({"fixed": fixed_s})["fixed"]
    print(f"target: recog/side >= 1.0. Lightning's Trainer() and fit() outside the steps: {fixed:.2f} s per round "
          f"(median), {fixed * rate['lightning'] / (cfg.batch_size * ctx.world_size):.1f} steps' worth")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", *(f"{side}_images_per_s" for side in sides),
                             *(f"{side}_cpu_ms_per_step" for side in sides), "lightning_outside_steps_s"])
            for r in range(args.rounds):
                writer.writerow([r, *(f"{figures[side][r]:.1f}" for side in sides),
                                 *(f"{cpu_ms[side][r]:.2f}" for side in sides), f"{fixed_s[r]:.3f}"])


if __name__ == "__main__":
    main()
