"""A recog training run, top to bottom: check, set up, build, train, evaluate, checkpoint, log.

Every rank runs `run(cfg)`. Rank 0 alone writes files (checkpoints, TensorBoard,
metrics.json); the other ranks log through stand-ins that do nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader
from torch.optim.lr_scheduler import LambdaLR

from recog import dist, parallel
from recog.checkpoint import load_checkpoint, load_newest_checkpoint, save_step_checkpoint, write_json
from recog.data.manifest import load_manifest
from recog.data.prepare import check_can_prepare, missing_splits, prepare_shards
from recog.data.source import ShardSource
from recog.data.random_access import ShardRandomAccess, collate
from recog.data.stream import Normalize, ShardStream, make_loader, stop_data_workers
from recog.data.write import measure_shards
from recog.errors import ConfigError, DataError
from recog.log import make_writer, setup_logging
from recog.model import check_backbone_name, load_weights, state_mismatch
from recog.preempt import Preempted, StopOnSignal
from recog.retrieval import retrieval_metrics
from recog.sampler import DistributedBatchSampler

log = logging.getLogger("recog")


# Every number a user can set, and what it must be: (key, whole number?, smallest allowed, strictly above it?)
NUMBERS = [
    ("epochs", True, 1, False), ("batch_size", True, 1, False), ("accumulate", True, 1, False),
    ("log_every", True, 1, False), ("seed", True, 0, False), ("eval.projector", True, 0, False),
    ("checkpoint.keep", True, 1, False), ("checkpoint.every_steps", True, 0, False),
    ("checkpoint.every_minutes", False, 0, False), ("schedule.warmup_epochs", False, 0, False),
    ("optim.lr", False, 0, False), ("optim.reference_batch", True, 1, False),
    ("data.num_workers", True, 0, False), ("data.shuffle_block", True, 1, False),
    ("data.http.retries", True, 0, False), ("data.http.backoff_s", False, 0, False),
    ("data.http.timeout_s", False, 0, True), ("dist.timeout_s", False, 0, True),
    ("ddp.bucket_cap_mb", False, 0, True), ("loss.ce_weight", False, 0, False),
    ("loss.metric_weight", False, 0, False), ("loss.label_smoothing", False, 0, False),
]


def check_number(key: str, value, whole: bool, least: float, above: bool) -> None:
    kind = "a whole number" if whole else "a number"
    bound = f"above {least}" if above else f"at least {least}"
    is_number = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
    if not is_number or value < least or (above and value == least):
        raise ConfigError(f"{key}={value} is not valid; give {kind} {bound}.")


def check_config(cfg: DictConfig) -> None:
    """Values that cannot work, each as one sentence. Runs on every rank before any process group exists."""
    for key in ("train", "test"):
        if OmegaConf.is_missing(cfg.data, key):
            raise ConfigError(f"data.{key} is not set; give the folder of its shards, e.g. data.{key}=/data/shards/{key}.")
    for key, whole, least, above in NUMBERS:
        check_number(key, OmegaConf.select(cfg, key), whole, least, above)
    if cfg.data.channels not in ("auto", 1, 3):
        raise ConfigError(f"data.channels={cfg.data.channels} is not valid; give 1 (grey), 3 (RGB) or auto.")
    if cfg.data.image_size != "auto":
        check_number("data.image_size", cfg.data.image_size, True, 8, False)
    for key in ("mean", "std"):
        values = cfg.data[key]
        if values != "auto" and (not OmegaConf.is_list(values) or not values or not all(
                isinstance(v, (int, float)) and (v > 0 or key == "mean") for v in values)):
            raise ConfigError(f"data.{key}={values} is not valid; give a list of numbers, one per channel"
                              f"{' (above 0)' if key == 'std' else ''}, e.g. data.{key}=[0.5], or auto.")
    check_number("augment.flip", cfg.augment.flip, False, 0, False)
    if cfg.augment.flip > 1:
        raise ConfigError(f"augment.flip={cfg.augment.flip} is a probability; give a number from 0 to 1.")
    if cfg.augment.get("pad", "auto") != "auto":
        check_number("augment.pad", cfg.augment.pad, True, 0, False)
    if cfg.sampler.name == "pk":
        for key in ("sampler.p", "sampler.k"):
            check_number(key, OmegaConf.select(cfg, key), True, 1, False)
    check_backbone_name(cfg.model.backbone)
    parallel.check_perf_config(cfg, cuda=torch.cuda.is_available() and cfg.dist.backend != "gloo")
    if cfg.loss.get("cross_rank") and cfg.sampler.name != "pk":
        raise ConfigError("loss.cross_rank=true needs equal batches on every rank; use sampler=pk.")
    check_can_prepare(cfg.data)


def run(cfg: DictConfig, run_dir: Path | None = None, stop: StopOnSignal | None = None) -> dict:
    """One training run on this rank. `stop`: signal handlers installed at program start (train.py);
    without it, run installs its own for the run's duration."""
    own_stop = stop is None
    stop = stop or StopOnSignal().install()
    try:
        check_config(cfg)
        if stop.caught:  # torchrun stops every rank when one fails: it failed before this one started
            raise Preempted("stopped before training started (when one rank fails, torchrun stops the others: "
                            "see its error above)", stop.caught)
        ctx = dist.setup(cfg.dist.backend, cfg.dist.timeout_s)
        stop.flag = dist.AnyRankFlag()  # from here on the ranks agree on when to stop
        try:
            metrics = train(cfg, ctx, Path(run_dir or HydraConfig.get().runtime.output_dir), stop)
            stop.finish()
            return metrics
        except RuntimeError as e:
            if ctx.is_distributed and dist.is_timeout(e):
                raise dist.RankTimeout(
                    f"rank {ctx.rank}: another rank did not answer within dist.timeout_s={cfg.dist.timeout_s:g} s "
                    "(it stopped, hung or died); stopping rather than waiting longer."
                ) from e
            if ctx.is_distributed and dist.is_peer_lost(e):
                raise dist.PeerLost(f"rank {ctx.rank}: another rank went away (its error, if it had one, is "
                                    "above); stopping too.") from e
            raise
        finally:
            stop.flag = None
            dist.teardown()
    except BaseException:
        # The data-loader workers ignore the stop signals (the training process decides when to stop), so
        # Python's exit, which sends them SIGTERM and then waits, would wait forever: end them here.
        stop_data_workers()
        raise
    finally:
        if own_stop:
            stop.uninstall()


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def shard_source(data_cfg: DictConfig) -> ShardSource:
    return ShardSource(cache_dir=data_cfg.cache_dir, retries=data_cfg.http.retries, backoff_s=data_cfg.http.backoff_s,
                       timeout_s=data_cfg.http.timeout_s, allowed_schemes=tuple(data_cfg.allowed_schemes))


SMALL_IMAGES = 64  # px: up to this (median shorter side), augment=auto picks the `small` preset, above `imagenet`
SMALLEST_AUTO_STD = 0.05  # data.std=auto: a channel's std (0..1 scale) below this is taken as this
LARGEST_AUTO_SIZE = 224  # image_size=auto never trains above this: ImageNet's size, what pretrained models expect


def settle_data_settings(cfg: DictConfig, manifest, source: ShardSource) -> str:
    """Replace every `auto` in data.channels / image_size / mean / std, and augment=auto, by what the training
    manifest says the images are (measured on a sample now if the shards were written by another tool).
    Returns the line that tells the user what was chosen and why."""
    data = cfg.data
    auto = [key for key in ("channels", "image_size", "mean", "std") if data[key] == "auto"]
    stats = manifest.stats
    if auto and not stats:
        stats = measure_shards(manifest, source)
    with open_dict(cfg):
        if "channels" in auto:
            data.channels = stats["channels"]
        if "image_size" in auto:
            data.image_size = min(stats["height"]["median"], stats["width"]["median"], LARGEST_AUTO_SIZE)
        for key in ("mean", "std"):
            if key in auto:  # a grey data set read as RGB (channels=3) repeats its one value, and the reverse
                values = stats[key] * 3 if len(stats[key]) < data.channels else stats[key]
                data[key] = [round(sum(values) / len(values), 4)] if data.channels == 1 else values[:3]
        if "std" in auto:  # a channel that hardly varies (solid colours) is not blown up into noise
            data.std = [max(value, SMALLEST_AUTO_STD) for value in data.std]
        chose = cfg.augment.name == "auto"
        if chose:
            preset = OmegaConf.to_container(cfg.augment["small" if data.image_size <= SMALL_IMAGES else "imagenet"],
                                            resolve=False)
            preset.update(flip=cfg.augment.flip, pad=cfg.augment.pad)  # the overrides given to augment=auto
            cfg.augment = preset
        if cfg.augment.get("pad") == "auto":  # 4 px at 28-32 px, 1 at 8 px: the same share of the image
            cfg.augment.pad = max(1, round(data.image_size / 8))
    for key in ("mean", "std"):
        if len(data[key]) != data.channels:
            raise ConfigError(f"data.{key} has {len(data[key])} values for {data.channels} channel(s); give one "
                              f"per channel, or data.{key}=auto.")
    line = f"data: {data.channels} channel(s), {data.image_size} px, mean {list(data.mean)}, std {list(data.std)}"
    if auto:
        height, width = stats["height"], stats["width"]
        line += (f" ({', '.join(auto)} from {stats['sampled']} images of {height['min']}-{height['max']} x "
                 f"{width['min']}-{width['max']} px)")
    knobs = ", ".join(f"{key} {cfg.augment[key]}" for key in ("pad", "flip") if key in cfg.augment)
    return line + f" | augment={cfg.augment.name} ({knobs}){' for that size' if chose else ''}"


@dataclass
class TrainData:
    loader: DataLoader
    epochs: ShardStream | DistributedBatchSampler  # set_epoch(e) before each epoch; len() = steps per epoch
    batch_size: int  # per rank
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_data(cfg: DictConfig, ctx: dist.Dist) -> tuple[TrainData, ShardStream]:
    def write_missing_shards():  # first use: one process per node writes them, the others wait
        if ctx.local_rank == 0 and missing_splits(cfg.data):
            prepare_shards(cfg.data, progress=ctx.is_main)

    source = shard_source(cfg.data)

    def open_manifests():
        train, test = load_manifest(cfg.data.train, source), load_manifest(cfg.data.test, source)
        if train.classes != test.classes:
            raise ConfigError(f"the train and test shards name different classes ({cfg.data.train} vs "
                              f"{cfg.data.test}); write both from the same source.")
        choices = settle_data_settings(cfg, train, source)  # the same on every rank: from the same manifest
        if ctx.is_main:
            log.info("%s", choices)
        if cfg.sampler.name != "pk":
            return train, test, None
        p, k = cfg.sampler.p, cfg.sampler.k
        if p > train.num_classes:
            raise ConfigError(f"sampler.p={p} asks for more classes per batch than the {train.num_classes} of "
                              f"{cfg.data.train}; use sampler.p={train.num_classes} or fewer.")
        if p * k > train.num_samples:
            raise ConfigError(f"sampler.p={p} x sampler.k={k} is a batch larger than the {train.num_samples} "
                              f"training samples of {cfg.data.train}; make P x K smaller.")
        return train, test, ShardRandomAccess(train, source, instantiate(cfg.augment.train), cfg.data.channels)

    # Every rank makes both calls, whatever it finds on its own disk, so the collectives stay paired.
    dist.fail_together(write_missing_shards, ctx, "writing the shards")
    train_manifest, test_manifest, random_access = dist.fail_together(open_manifests, ctx, "opening the shards")
    pin = ctx.device.type == "cuda"
    common = dict(rank=ctx.rank, world_size=ctx.world_size, batch_size=cfg.batch_size, channels=cfg.data.channels,
                  seed=cfg.seed, strict=cfg.data.strict, source=source)
    test_set = ShardStream(test_manifest, transform=instantiate(cfg.augment.test), train=False, **common)
    if random_access is not None:  # class-balanced P×K batches for metric learning
        sampler = DistributedBatchSampler(random_access.labels, cfg.sampler.p, cfg.sampler.k, rank=ctx.rank,
                                          world_size=ctx.world_size, seed=cfg.seed)
        loader = make_loader(random_access, cfg.data.num_workers, pin, batch_sampler=sampler, collate_fn=collate)
        return TrainData(loader, sampler, cfg.sampler.p * cfg.sampler.k, train_manifest.classes), test_set
    stream = ShardStream(train_manifest, transform=instantiate(cfg.augment.train), train=True,
                         shuffle_block=cfg.data.shuffle_block, **common)
    loader = make_loader(stream, cfg.data.num_workers, pin)
    return TrainData(loader, stream, cfg.batch_size, train_manifest.classes), test_set


class Checkpoints:
    """What a checkpoint holds, and when rank 0 writes one: at the end of every epoch, and within
    epochs every `checkpoint.every_steps` steps and/or `checkpoint.every_minutes` minutes. Rank 0
    decides alone (the time is its clock): saving needs nothing from the other ranks, whose model,
    optimizer and data position equal rank 0's after every step."""

    def __init__(self, cfg: DictConfig, ctx: dist.Dist, folder: Path, model, optimizer, scheduler, scaler,
                 batches_per_epoch: int, layout: dict):
        self.folder, self.is_main, self.batches_per_epoch = folder, ctx.is_main, batches_per_epoch
        self.keep, self.every_steps, self.every_minutes = (cfg.checkpoint.keep, cfg.checkpoint.every_steps,
                                                           cfg.checkpoint.every_minutes)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.layout = layout  # what a mid-epoch data position is valid for
        self.best_top1 = -1.0
        self.last_step, self.last_time = -1, time.monotonic()

    def save(self, epoch: int, step: int, consumed: list[int], top1: float = float("nan")) -> Path | None:
        """`epoch`: epochs finished; `consumed`: batches of the next one already trained on, per worker."""
        is_best = top1 >= self.best_top1  # False for a mid-epoch checkpoint (nan)
        if is_best:
            self.best_top1 = top1
        if not self.is_main or step == self.last_step:
            return None
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step,
            "data": {"consumed": list(consumed), **self.layout}, "top1": top1, "best_top1": self.best_top1,
            "config": self.config, "rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
        }
        path = save_step_checkpoint(state, self.folder, step, self.keep, is_best)
        self.last_step, self.last_time = step, time.monotonic()
        return path

    def maybe_save_mid_epoch(self, epoch: int, step: int, consumed: list[int]) -> None:
        if sum(consumed) >= self.batches_per_epoch:  # the epoch's last step: its end-of-epoch checkpoint follows
            return
        due = (self.every_steps and step % self.every_steps == 0) or \
              (self.every_minutes and time.monotonic() - self.last_time >= 60 * self.every_minutes)
        if due:
            self.save(epoch, step, consumed)


@dataclass
class EpochStats:
    step: int
    loss: float
    images: int  # over all ranks
    seconds: float
    data_wait: float  # fraction of step time spent waiting for the next batch (mean over ranks)
    skipped: int  # unreadable samples, over all ranks
    stopped: bool  # a rank was asked to stop (SIGTERM/SIGUSR1): every rank left the epoch after this step


@dataclass
class StepRecipe:
    """How one optimizer step is taken, besides the data (see recog/parallel.py for the knobs)."""

    model: torch.nn.Module  # what the loop calls: DDP-wrapped (and compiled) when so configured
    normalize: Normalize
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler  # fp16 loss scaling; a pass-through otherwise
    autocast: Callable[[], AbstractContextManager]  # the forward pass's precision
    accumulate: int = 1  # micro-batches per optimizer step
    channels_last: bool = False


def train_one_epoch(recipe: StepRecipe, loader, ctx: dist.Dist, writer, step: int, log_every: int, epoch: int,
                    consumed: list[int], batches_per_epoch: int, checkpoints: Checkpoints, stop: StopOnSignal,
                    first_of_run: bool = False) -> EpochStats:
    """One epoch (or the rest of one) of DDP training; `step` counts optimizer steps.

    `consumed` counts the epoch's batches trained on, per data-loader worker: the data
    position a mid-epoch checkpoint records. With `accumulate` > 1, the gradients of that
    many batches are summed before each optimizer step; DDP's all-reduce runs on the last
    of them only (no_sync), and the epoch's last group may be shorter. With `first_of_run`,
    the wait for the very first batch (starting the workers, seconds) is logged as
    train/startup_s, not as data wait.
    """
    r = recipe
    r.model.train()
    # The loss sum stays on the device: calling .item() every step would make the CPU wait for the GPU.
    loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
    window = [0.0, 0.0, 0.0]  # samples, skipped samples, seconds waiting for data: since the last log line
    totals = torch.zeros(4, dtype=torch.float64)  # the same four, over the epoch, for this rank
    stopped = False
    batch_index = sum(consumed)  # accumulation groups count from the epoch's first batch
    epoch_start = window_start = tick = time.perf_counter()
    for batch in loader:
        waited = time.perf_counter() - tick
        for message in batch.warnings:  # from the data-loader workers: to this rank's log (rank 0: train.log)
            log.warning("%s", message)
        if first_of_run:
            writer.add_scalar("train/startup_s", waited, step)
            first_of_run, waited = False, 0.0
            epoch_start = window_start = time.perf_counter()
        if batch.images.dim() != 4:
            raise DataError("every sample of a rank's first batch was unreadable; the shards are damaged: "
                            "write them again.")
        images = r.normalize(batch.images.to(ctx.device, non_blocking=True))
        if r.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch.labels.to(ctx.device, non_blocking=True)
        batch_index += 1
        ends_group = batch_index % r.accumulate == 0 or batch_index == batches_per_epoch
        with parallel.no_sync(r.model, sync=ends_group):
            with r.autocast():
                loss = r.loss_fn(r.model(images), labels)["total"]
            r.scaler.scale(loss / r.accumulate).backward()
        consumed[batch.worker] += 1
        loss_sum += loss.detach() * len(labels)
        window = [window[0] + len(labels), window[1] + batch.skipped, window[2] + waited]
        if not ends_group:
            tick = time.perf_counter()
            continue
        r.scaler.step(r.optimizer)
        r.scaler.update()
        r.optimizer.zero_grad(set_to_none=True)
        r.scheduler.step()
        step += 1
        if step % log_every == 0:  # every rank reaches this at the same step: the all-reduce cannot hang
            elapsed = time.perf_counter() - window_start
            mine = torch.cat([loss_sum.reshape(1).cpu(), torch.tensor(window, dtype=torch.float64)])
            totals += mine
            loss_total, n, skipped, wait = dist.all_reduce_sum(mine.to(ctx.device)).tolist()
            writer.add_scalar("train/loss", loss_total / n, step)
            writer.add_scalar("train/lr", r.scheduler.get_last_lr()[0], step)
            writer.add_scalar("train/images_per_s", n / elapsed, step)
            writer.add_scalar("train/data_wait_frac", wait / ctx.world_size / elapsed, step)
            writer.add_scalar("data/skipped_samples", skipped, step)
            loss_sum.zero_()
            window, window_start = [0.0, 0.0, 0.0], time.perf_counter()
        if stop.agreed():
            stopped = True
            break
        checkpoints.maybe_save_mid_epoch(epoch, step, consumed)
        tick = time.perf_counter()
    totals += torch.cat([loss_sum.reshape(1).cpu(), torch.tensor(window, dtype=torch.float64)])
    seconds = dist.all_reduce_max(torch.tensor([time.perf_counter() - epoch_start], device=ctx.device)).item()
    loss_total, n, skipped, wait = dist.all_reduce_sum(totals.to(ctx.device)).tolist()
    return EpochStats(step, loss_total / max(n, 1), int(n), seconds, wait / ctx.world_size / max(seconds, 1e-9),
                      int(skipped), stopped)


@dataclass
class Evaluation:
    top1: float
    seen: int  # test samples evaluated, over all ranks: each exactly once
    retrieval: dict[str, float]  # recall@1/5/10 and map@r, when asked for
    embeddings: torch.Tensor | None = None  # this rank's, for the projector
    labels: torch.Tensor | None = None
    images: torch.Tensor | None = None  # this rank's first images, uint8, for the projector's thumbnails


@torch.no_grad()
def evaluate(model, loader, normalize, ctx: dist.Dist, retrieval: bool = False, keep_images: int = 0) -> Evaluation:
    """Top-1 over the test split, and optionally retrieval metrics with each test image queried against
    all the others. Each rank holds a disjoint slice (no padding), so every test image counts exactly once."""
    model.eval()
    counts = torch.zeros(2, device=ctx.device, dtype=torch.int64)  # [correct, seen]
    embeddings, labels_seen, images = [], [], []
    for batch in loader:
        for message in batch.warnings:
            log.warning("%s", message)
        if len(batch.labels) == 0:  # all of its samples unreadable (counted by the loader)
            continue
        labels = batch.labels.to(ctx.device, non_blocking=True)
        out = model(normalize(batch.images.to(ctx.device, non_blocking=True)))
        counts += torch.stack([(out.logits.argmax(dim=1) == labels).sum(), torch.tensor(len(labels), device=ctx.device)])
        if retrieval:
            embeddings.append(out.embeddings)
            labels_seen.append(labels)
            if sum(len(x) for x in images) < keep_images:
                images.append(batch.images)
    model.train()
    correct, seen = dist.all_reduce_sum(counts).tolist()
    result = Evaluation(correct / max(seen, 1), seen, {})
    if retrieval:
        result.embeddings, result.labels = torch.cat(embeddings), torch.cat(labels_seen)
        result.images = torch.cat(images)[:keep_images] if images else None
        # every rank gathers the whole test set (slices of unequal size) and computes the same figures
        result.retrieval = retrieval_metrics(dist.all_gather_uneven(result.embeddings),
                                             dist.all_gather_uneven(result.labels))
    return result


def find_resume_point(cfg: DictConfig, run_dir: Path, ctx: dist.Dist, model) -> tuple[str, dict] | None:
    """The checkpoint to continue from, read on rank 0 and handed to every rank.

    First this run directory's own newest readable checkpoint (a restarted or requeued
    run continues where it stopped, with no flag; `checkpoint.auto_resume=false` turns
    that off), else the file given as `resume=`, else none: a fresh start. Every rank
    checks that it fits `model` (the same answer everywhere: no rank is left waiting).
    """
    def read():
        if cfg.checkpoint.auto_resume:
            found = load_newest_checkpoint(run_dir / "checkpoints", log)
            if found:
                return str(found[0]), found[1]
        return (str(cfg.resume), load_checkpoint(cfg.resume, "resume=")) if cfg.resume else None

    found = dist.run_on_rank0(read, ctx, "reading the checkpoint")
    if not found:
        return None
    path, ckpt = found
    lacking = {"model", "optimizer", "scheduler", "epoch", "step", "best_top1", "rng"} - set(ckpt)
    if lacking:
        raise ConfigError(f"{path} is not a recog training checkpoint (no {sorted(lacking)[0]}); "
                          "to start from plain weights use weights= instead of resume=.")
    problem = state_mismatch(model.state_dict(), ckpt["model"])
    if problem:
        saved = ckpt.get("config", {}).get("model", {})
        own_run = Path(path).parent == run_dir / "checkpoints"
        fix = (f"this run directory ({run_dir}) belongs to that run: give a new hydra.run.dir, or the model "
               "settings it was trained with" if own_run else
               "resume with the model settings it was trained with, or start from its weights with weights= "
               "instead of resume=")
        raise ConfigError(f"{path} holds a {saved.get('backbone', 'different')} model that does not fit the "
                          f"{cfg.model.backbone} model of this run ({problem}); {fix}.")
    return found


def override_hparams() -> dict:
    """The command line's overrides (what a sweep varies), for TensorBoard's hparams dashboard."""
    if not HydraConfig.initialized():
        return {}
    out = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.partition("=")
        try:
            out[key] = float(value) if any(c in value for c in ".e") else int(value)
        except ValueError:
            out[key] = value
    return out


def train(cfg: DictConfig, ctx: dist.Dist, run_dir: Path, stop: StopOnSignal) -> dict:
    setup_logging(run_dir, ctx.is_main)
    if ctx.is_main:
        log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    torch.manual_seed(cfg.seed)

    train_data, test_set = build_data(cfg, ctx)
    pin = ctx.device.type == "cuda"
    test_loader = make_loader(test_set, cfg.data.num_workers, pin)
    normalize = Normalize(cfg.data.mean, cfg.data.std, ctx.device)

    model = instantiate(cfg.model, num_classes=train_data.num_classes, in_channels=cfg.data.channels)
    if cfg.weights:  # only rank 0 reads the file; DDP below copies rank 0's weights to every rank
        weights = dist.run_on_rank0(lambda: load_checkpoint(cfg.weights, "weights="), ctx, "reading model weights")
        for note in load_weights(model, weights):
            log.info("weights %s: %s", cfg.weights, note)
    model = parallel.prepare_model(model, cfg, ctx.is_distributed)  # SyncBatchNorm, channels_last
    model.to(ctx.device)  # before the optimizer exists: its state must live where the parameters live

    batches_per_epoch = len(train_data.epochs)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.accumulate)  # optimizer steps
    global_batch = train_data.batch_size * ctx.world_size * cfg.accumulate
    lr = cfg.optim.lr * global_batch / cfg.optim.reference_batch  # linear scaling rule (Goyal et al., 2017)
    optimizer = instantiate(cfg.optim.optimizer)(model.parameters(), lr=lr)
    lr_factor = partial(warmup_cosine, warmup_steps=round(cfg.schedule.warmup_epochs * steps_per_epoch),
                        total_steps=cfg.epochs * steps_per_epoch)
    scheduler = LambdaLR(optimizer, lr_factor)
    scaler = parallel.grad_scaler(cfg, ctx.device)
    loss_fn = instantiate(cfg.loss)
    if loss_fn.cross_rank and ctx.is_distributed:
        loss_fn.gather = dist.all_gather_with_grad

    # Where the data stands within an epoch: batches trained on, per data-loader worker (the stream's
    # workers each read their own part of the epoch; the P×K sampler is one sequence).
    consumed = [0] * (max(1, cfg.data.num_workers) if cfg.sampler.name != "pk" else 1)
    layout = {"world_size": ctx.world_size, "batch_size": train_data.batch_size, "sampler": cfg.sampler.name,
              "workers": len(consumed), "accumulate": cfg.accumulate}
    checkpoints = Checkpoints(cfg, ctx, run_dir / "checkpoints", model, optimizer, scheduler, scaler,
                              batches_per_epoch, layout)
    start_epoch, step = 0, 0
    found = find_resume_point(cfg, run_dir, ctx, model)
    if found:
        path, ckpt = found
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        # This run's LR, which differs from the checkpoint's if the world size or the number of epochs changed.
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(scheduler.last_epoch)
        torch.set_rng_state(ckpt["rng"])
        if "cuda_rng" in ckpt and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        start_epoch, step, checkpoints.best_top1 = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
        checkpoints.last_step = step
        position = ckpt.get("data", {})
        if any(position.get("consumed", [])):
            if {key: position.get(key) for key in layout} == layout:
                consumed = list(position["consumed"])
            else:  # the batches of another world size, batch size or worker count: not this run's
                log.warning("the mid-epoch data position in %s was saved with %s; this run has %s, so epoch %d "
                            "starts again from its first batch", path, {k: position.get(k) for k in layout}, layout,
                            start_epoch + 1)
        log.info("resumed from %s: step %d, %d epoch(s) done%s", path, step, start_epoch,
                 f" and {sum(consumed)} of {batches_per_epoch} batches of epoch {start_epoch + 1}" if any(consumed)
                 else "")

    if found and start_epoch >= cfg.epochs and not any(consumed):  # started again after it had finished
        log.info("nothing to train: %s holds all %d epochs (give a larger epochs= to train on)", found[0], cfg.epochs)
        return {"epoch": start_epoch, "step": step, "top1": ckpt["top1"], "best_top1": ckpt["best_top1"]}

    recipe = StepRecipe(
        parallel.wrap_model(model, cfg, ctx.is_distributed, ctx.device),  # DDP: every rank now holds rank 0's weights
        normalize, loss_fn, optimizer, scheduler, scaler, partial(parallel.autocast, cfg, ctx.device),
        cfg.accumulate, cfg.perf.channels_last)

    log.info("world size %d (%s on %s) | per-rank batch %d%s, global batch %d | %d steps per epoch, %d epochs | "
             "lr %.4g = %.4g x %d / %d | %s", ctx.world_size, ctx.backend or "single process", ctx.device,
             train_data.batch_size, f" x {cfg.accumulate} accumulated" if cfg.accumulate > 1 else "", global_batch,
             steps_per_epoch, cfg.epochs, lr, cfg.optim.lr, global_batch, cfg.optim.reference_batch,
             cfg.perf.precision)

    # Resuming in the same run directory: TensorBoard hides what the interrupted run logged after this step.
    writer = make_writer(run_dir, ctx.is_main, purge_step=step if found else None)
    top1, eval_count, images, seconds, skipped, stats, retrieval = float("nan"), 0, 0, 0.0, 0, None, {}
    train_data.epochs.set_epoch(start_epoch, consumed)
    batches = iter(train_data.loader)  # starts the workers
    for epoch in range(start_epoch, cfg.epochs):
        stats = train_one_epoch(recipe, batches, ctx, writer, step, cfg.log_every, epoch, consumed, batches_per_epoch,
                                checkpoints, stop, first_of_run=epoch == start_epoch)
        step, images, seconds, skipped = stats.step, images + stats.images, seconds + stats.seconds, skipped + stats.skipped
        if stats.stopped:  # SIGTERM/SIGUSR1: every rank stopped after this same step
            path = checkpoints.save(epoch, step, consumed) or checkpoints.folder / f"step-{step:09d}.pt"
            dist.control_barrier()  # no rank exits (which makes torchrun stop the others) before it is written
            writer.close()
            signal_name = stop.caught or "another rank's signal"
            raise Preempted(f"stopped on {signal_name} at step {step}; "
                            f"checkpoint {path} written: run the same command again (same run directory) to "
                            "continue", stop.caught)
        consumed = [0] * len(consumed)
        if epoch + 1 < cfg.epochs:  # the workers fill their queue with the next epoch while we evaluate
            train_data.epochs.set_epoch(epoch + 1)
            batches = iter(train_data.loader)

        dist.broadcast_buffers(model)  # rank 0's BatchNorm statistics everywhere: all ranks evaluate one model
        last_epoch = epoch + 1 == cfg.epochs
        result = evaluate(model, test_loader, normalize, ctx, retrieval=cfg.eval.retrieval,
                          keep_images=cfg.eval.projector if last_epoch else 0)
        top1, eval_count, retrieval = result.top1, result.seen, result.retrieval
        log.info("epoch %d/%d | loss %.4f | top-1 %.4f on %d test images%s | %.0f images/s | data wait %.1f%%%s",
                 epoch + 1, cfg.epochs, stats.loss, top1, eval_count,
                 "".join(f" | {k} {v:.4f}" for k, v in retrieval.items()), stats.images / stats.seconds,
                 100 * stats.data_wait, f" | skipped {stats.skipped} unreadable samples" if stats.skipped else "")
        writer.add_scalar("eval/top1", top1, step)
        for name, value in retrieval.items():
            writer.add_scalar(f"eval/{name}", value, step)
        if result.images is not None:  # TensorBoard's projector: a sample of the test embeddings, with thumbnails
            n = len(result.images)
            writer.add_embedding(result.embeddings[:n].cpu(), global_step=step, tag="test",
                                 metadata=[train_data.classes[i] for i in result.labels[:n].tolist()],
                                 label_img=result.images.float().div(255).expand(-1, 3, -1, -1))
        writer.add_scalar("train/epoch_loss", stats.loss, step)
        writer.add_scalar("train/epoch_images_per_s", stats.images / stats.seconds, step)
        writer.add_scalar("train/epoch_data_wait_frac", stats.data_wait, step)
        checkpoints.save(epoch + 1, step, consumed, top1)

    best_top1 = checkpoints.best_top1
    metrics = {
        "epoch": max(cfg.epochs, start_epoch), "step": step, "top1": top1, "best_top1": best_top1,
        "eval_samples": eval_count, "images_per_s": images / seconds if seconds else 0.0,
        "train_loss": stats.loss if stats else float("nan"),
        "data_wait_frac": stats.data_wait if stats else float("nan"), "skipped_samples": skipped,
        "world_size": ctx.world_size, "global_batch": global_batch, "lr": lr,
        **(retrieval if stats else {}),
    }
    if ctx.is_main:
        write_json(metrics, run_dir / "metrics.json")
        hparams = {"model": cfg.model.backbone, "optimizer": cfg.optim.optimizer._target_.rsplit(".", 1)[-1],
                   "lr": lr, "global_batch": global_batch, "epochs": cfg.epochs, "seed": cfg.seed,
                   "world_size": ctx.world_size, "precision": cfg.perf.precision, "accumulate": cfg.accumulate,
                   **override_hparams()}
        writer.add_hparams(hparams, {"hparam/top1": top1, "hparam/images_per_s": metrics["images_per_s"]},
                           run_name=".")
        writer.close()
        log.info("done: top-1 %.4f, %.0f images/s; outputs in %s", top1, metrics["images_per_s"], run_dir)
    return metrics
