"""What a training run is made of: its data (`build_data`) and its step recipe (`build_recipe`: model, loss,
optimizer, LR schedule).

Both run on every rank in the same order; what only rank 0 may do (write the shards once, read weights)
goes through `recog.dist`'s helpers, which keep the ranks' collectives paired.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from recog import dist, finetune, parallel
from recog.config import (
    check_against_data,
    data_mix,
    folders_line,
    global_batch_micro_batches,
    settle_classifier,
    settle_data_settings,
)
from recog.data.decode import Decode, crop_while_decoding, decode_image
from recog.data.gpu_decode import DecodeOnDevice
from recog.data.loader import Batch, loader_workers, make_loader
from recog.data.manifest import Manifest, into_classes, load_manifests
from recog.data.normalize import Normalize
from recog.data.plan import Mix, rank_micro_batches
from recog.data.position import Position
from recog.data.prepare import missing_splits, prepare_shards
from recog.data.random_access import ShardRandomAccess, collate
from recog.data.sampler import DistributedBatchSampler
from recog.data.source import ShardSource
from recog.data.stream import ShardStream, fits_in_memory
from recog.ema import build_ema
from recog.errors import ConfigError
from recog.finetune import BackboneFreeze, GroupSettings, loss_parameters
from recog.imprint import read_weights, start_from_weights
from recog.loss import RecognitionLoss
from recog.mixing import build_mixing
from recog.pretrained import build_model
from recog.sharded import SAME_START_VALUES, ShardedClassifier, ShardedLoss
from recog.step import StepRecipe, lr_schedule

log = logging.getLogger("recog")


@dataclass
class TrainData:
    loader: DataLoader
    epochs: ShardStream | DistributedBatchSampler  # set_epoch(e) before each epoch; len() = batches per epoch
    test_loader: DataLoader
    batch_size: int  # of one micro-batch: one forward pass
    classes: list[str]
    layout: dict  # what a mid-epoch data position is valid for: saved with it, compared on resume
    gallery_loader: DataLoader | None = None  # eval.gallery's images (each once over the ranks); None: leave-one-out
    # data.decode=gpu: the training batches come from the workers encoded, and are decoded here, on the GPU
    decode_on_device: Callable[[Batch], Batch] | None = None
    train_manifest: Manifest | None = None  # the training shards (their classes are `classes`), read by index for
    # what needs chosen training images (weights=: the new classes' rows, imprinted)

    @property
    def global_batch(self) -> int:
        return self.layout["global_batch"]

    def start(self, world_size: int = 1) -> Position:
        """A fresh run's position: no epoch done, no step of the first one done (`world_size`: saved with it)."""
        return Position(batches_per_epoch=len(self.epochs), layout=self.layout, world_size=world_size)

    def batches(self, position: Position) -> Iterator[Batch]:
        """The batches (one per step) of `position`'s epoch not yet trained on; the loader's workers start
        reading now. data.decode=gpu: each decoded and augmented as it is taken (the loop's data wait includes that)."""
        self.epochs.set_epoch(position.epoch, position.done)
        batches = iter(self.loader)
        return map(self.decode_on_device, batches) if self.decode_on_device else batches


def shard_source(data_cfg: DictConfig) -> ShardSource:
    return ShardSource(cache_dir=data_cfg.cache_dir, retries=data_cfg.http.retries, backoff_s=data_cfg.http.backoff_s,
                       timeout_s=data_cfg.http.timeout_s, allowed_schemes=tuple(data_cfg.allowed_schemes))


def build_data(cfg: DictConfig, ctx: dist.Dist, saved: dict | None = None) -> TrainData:
    """Write missing shards (first use), read the manifests, settle data.*=auto, and make the loaders: a
    stream of shuffled shard samples, or (sampler=pk) class-balanced P×K batches read by index. Each step's
    global batch is made of micro-batches (recog.data.plan): `saved` is the data position of the checkpoint
    this run continues from (its global batch is kept)."""
    source = shard_source(cfg.data)
    workers, workers_line = data_workers(cfg, ctx)
    global_batch, micro_batches = global_batch_micro_batches(cfg, ctx.world_size, saved)
    # Every rank makes both calls, whatever it finds on its own disk, so the collectives stay paired.
    dist.fail_together(partial(write_missing_shards, cfg.data, ctx), ctx, "writing the shards")
    shards = dist.fail_together(partial(open_shards, cfg, ctx, source, workers_line, micro_batches), ctx,
                                "opening the shards")
    check_resumed_data(saved, shards.layout())  # the same on every rank: from the same manifests and checkpoint
    pin = ctx.device.type == "cuda"
    common = dict(rank=ctx.rank, world_size=ctx.world_size, batch_size=cfg.batch_size, channels=cfg.data.channels,
                  seed=cfg.seed, strict=cfg.data.strict, source=source)
    test_loader = evaluation_loader(cfg, shards.test, common, workers, pin)
    # eval.gallery's images, embedded like the test images: each rank its own slice, each image once
    gallery_loader = evaluation_loader(cfg, shards.gallery, common, workers, pin) if shards.gallery else None
    if shards.random_access is not None:  # class-balanced P×K batches (metric learning): one sequence, any workers
        epochs = DistributedBatchSampler(shards.random_access.labels, cfg.sampler.p, cfg.sampler.k, rank=ctx.rank,
                                         world_size=ctx.world_size, seed=cfg.seed, micro_batches=micro_batches)
        loader = make_loader(shards.random_access, workers, pin, batch_sampler=epochs, collate_fn=collate)
        batch_size = cfg.sampler.p * cfg.sampler.k
    else:  # each data-loader worker makes its own block of the epoch's steps
        epochs = training_stream(cfg, shards.train, common, micro_batches, shards.mix)
        loader = make_loader(epochs, workers, pin)
        batch_size = cfg.batch_size
    layout = {"global_batch": global_batch, "micro_batches": micro_batches, "batch_size": batch_size,
              "sampler": cfg.sampler.name, **shards.layout()}
    decode_on_device = DecodeOnDevice(instantiate(cfg.augment.train), ctx.device, cfg.data.channels,
                                      cfg.data.strict) if cfg.data.decode == "gpu" else None
    return TrainData(loader, epochs, test_loader, batch_size, shards.train.classes, layout, gallery_loader,
                     decode_on_device, shards.train)


def data_workers(cfg: DictConfig, ctx: dist.Dist) -> tuple[int, str]:
    """Loader workers per rank (data.num_workers; auto: this node's cores shared among its ranks), and the words
    that tell the user so."""
    cores = len(os.sched_getaffinity(0))  # the CPUs this process may run on, shared by the node's ranks
    workers = loader_workers(cfg.data.num_workers, ctx.local_world_size, cores)
    auto = cfg.data.num_workers == "auto"
    why = f" (auto: {cores} cores, {ctx.local_world_size} rank(s) on this node)" if auto else ""
    return workers, f"{workers} loader worker(s) per rank{why}"


def write_missing_shards(data_cfg: DictConfig, ctx: dist.Dist) -> None:
    """First use: one process per node writes the shards, the others wait."""
    if ctx.local_rank == 0 and missing_splits(data_cfg):
        prepare_shards(data_cfg, progress=ctx.is_main)


@dataclass(frozen=True)
class Shards:
    """What build_data reads: the training folders' union, the test split and eval.gallery's shards (None:
    leave-one-out on the test split) with their labels mapped to the training classes by name, sampler=pk's
    training samples read by index, and data.mix's shares of each epoch (None: all of every folder)."""

    train: Manifest
    test: Manifest
    gallery: Manifest | None
    random_access: ShardRandomAccess | None
    mix: Mix | None

    def layout(self) -> dict:
        """What a mid-epoch position depends on besides the batches: which shards (each folder's identity) and
        which share of each an epoch reads."""
        return {"folders": [part.shards_identity for part in self.train.parts()],
                "mix": list(self.mix.shares) if self.mix else None}


def open_shards(cfg: DictConfig, ctx: dist.Dist, source: ShardSource, workers_line: str, micro_batches: int
                ) -> Shards:
    """The train, test and eval.gallery manifests, with data.*=auto settled into `cfg` from the training manifest
    and the config checked against the data (the same on every rank: from the same manifests), and for sampler=pk
    the training samples, read by index. data.train and data.test may each be a list of folders: their classes
    are united by name (recog.data.manifest.union), the test split's mapped to the training ones."""
    train, test = load_manifests(cfg.data.train, source), load_manifests(cfg.data.test, source)
    gallery = None
    if cfg.eval.retrieval and cfg.eval.gallery not in (None, "test"):
        gallery = train if cfg.eval.gallery == "train" else load_manifests(cfg.eval.gallery, source)
    mix = data_mix(cfg.data, train)
    settings = settle_data_settings(cfg, train, source)
    settings.write_into(cfg)
    classifier_line = settle_classifier(cfg, len(train.classes))  # model.classifier=auto, from the class count
    if ctx.is_main:
        log.info("%s", folders_line(train, test, mix))
        log.info("%s | %s", settings.line, workers_line)
        if classifier_line:
            log.info("%s", classifier_line)
    check_against_data(cfg, train, test, gallery, micro_batches, ctx.world_size)
    test = into_classes(test, train.classes)  # labels of the training classes, by name
    gallery = None if gallery is None else into_classes(gallery, train.classes)
    if cfg.sampler.name != "pk":
        return Shards(train, test, gallery, None, mix)
    if cfg.data.decode == "gpu":  # the workers hand over the training images encoded (recog/data/gpu_decode.py)
        return Shards(train, test, gallery, ShardRandomAccess(train, source, channels=cfg.data.channels,
                                                              encoded=True), mix)
    decode, transform = train_decoding(cfg, keep_decoded=False)
    return Shards(train, test, gallery, ShardRandomAccess(train, source, transform, cfg.data.channels, decode), mix)


def check_resumed_data(saved: dict | None, layout: dict) -> None:
    """A checkpoint's mid-epoch position counts steps of its epoch's plan, which follows the shards and data.mix it
    was saved with: resumed over others it would read some samples twice and others never, so it is refused. At
    an epoch's end the next epoch reads this run's folders (the daily loop adds a folder there): said once."""
    if not saved or "folders" not in saved or (saved["folders"], saved.get("mix")) == (layout["folders"],
                                                                                       layout["mix"]):
        return
    if saved["done"]:
        raise ConfigError(f"the checkpoint stopped in the middle of an epoch of {len(saved['folders'])} training "
                          f"folder(s) (identities {', '.join(saved['folders'])}, data.mix={saved.get('mix')}), but "
                          f"this run reads {len(layout['folders'])} (identities {', '.join(layout['folders'])}, "
                          f"data.mix={layout['mix']}); resume with the data.train and data.mix it was saved with, "
                          "or from a checkpoint saved at the end of an epoch.")
    log.info("the training data changed since the checkpoint (%d folder(s), data.mix=%s then; %d, data.mix=%s now): "
             "the next epoch reads this run's", len(saved["folders"]), saved.get("mix"), len(layout["folders"]),
             layout["mix"])


def evaluation_loader(cfg: DictConfig, manifest: Manifest, common: dict, workers: int, pin: bool) -> DataLoader:
    """A split read for evaluation: each rank its own slice, each image once, kept decoded if it fits."""
    images = ShardStream(manifest, transform=instantiate(cfg.augment.test), train=False,
                         keep_decoded=fits_in_memory(manifest, cfg.data.keep_decoded_mb), **common)
    loader = make_loader(images, workers, pin)
    # Its workers' seeds from a generator of its own: an evaluation (eval.every_steps, or the first after a resume)
    # draws nothing from the training's random generator.
    loader.generator = torch.Generator()
    return loader


def training_stream(cfg: DictConfig, manifest: Manifest, common: dict, micro_batches: int, mix: Mix | None = None
                    ) -> ShardStream:
    """sampler=stream's training epochs: shuffled shard samples (`mix`: data.mix's share of each folder), a batch of
    each of this rank's micro-batches a step. data.decode=gpu: the workers hand over the images encoded
    (recog/data/gpu_decode.py)."""
    on_gpu = cfg.data.decode == "gpu"
    keep_decoded = fits_in_memory(manifest, cfg.data.keep_decoded_mb)  # on_gpu: the encoded bytes kept
    decode, transform = train_decoding(cfg, keep_decoded) if not on_gpu else (None, None)
    return ShardStream(manifest, transform=transform, decode=decode, train=True, shuffle_block=cfg.data.shuffle_block,
                       keep_decoded=keep_decoded, encoded=on_gpu, micro_batches=micro_batches, mix=mix, **common)


def train_decoding(cfg: DictConfig, keep_decoded: bool) -> tuple[Decode, Callable | None]:
    """The training images' decode step and the augmentation after it. data.jpeg_scaled_decode (auto, true): a
    preset's leading RandomResizedCrop is done while decoding, JPEGs at a reduced scale (recog/data/decode.py);
    not for a split kept decoded, whose kept images must be whole."""
    transform = instantiate(cfg.augment.train)
    if keep_decoded or cfg.data.jpeg_scaled_decode is False:
        return decode_image, transform
    return crop_while_decoding(transform)


def build_loss(cfg: DictConfig, num_classes: int, ctx: dist.Dist | None = None) -> RecognitionLoss | ShardedLoss:
    """The loss of `cfg.loss`, told what only the data knows: a proxy loss's `num_classes: auto` is the training
    shards' `num_classes` (`cfg` stays as configured; recog.config checks the loss, before and against the data).
    model.classifier=sharded: RecognitionLoss's settings, its metric-learning term included, with this rank's rows
    of the classifier (`ctx`: which rank of how many), recog.sharded.ShardedLoss."""
    metric = cfg.loss.get("metric")
    auto = metric is not None and metric.get("num_classes") == "auto"
    if cfg.model.get("classifier", "replicated") == "sharded":
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        loss = cfg.loss
        classifier = ShardedClassifier(num_classes, cfg.model.embedding_dim, rank, world, loss.logit_scale,
                                       loss.label_smoothing, loss.arc_margin, loss.get("sample_rate", 1.0), cfg.seed)
        if num_classes * cfg.model.embedding_dim <= SAME_START_VALUES:
            # The rows RecognitionModel would have drawn with the same seed: the global generator stands where the
            # model, which drew no rows, left it. The same seed starts replicated and sharded runs from the same
            # numbers, whatever the world size (the generator then moves on as the replicated model's does).
            classifier.load_rows(torch.randn(num_classes, cfg.model.embedding_dim) * 0.01)
        # metric_weight 0 is no term (RecognitionLoss), so its metric is not built
        # built whatever its weight, as instantiate(cfg.loss) builds it for the replicated classifier (a proxy loss
        # draws its proxies from the global generator: the same seed, the same numbers); weight 0 then drops it
        term = instantiate(metric, **({"num_classes": num_classes} if auto else {})) if metric is not None else None
        return ShardedLoss(classifier, ce_weight=loss.ce_weight, lr_scale=loss.lr_scale, metric=term,
                           metric_weight=loss.metric_weight)
    if auto:
        return instantiate(cfg.loss, metric={"num_classes": num_classes})
    return instantiate(cfg.loss)


def parameter_groups(model: nn.Module, loss_fn: nn.Module, lr: float, settings: GroupSettings | None = None
                     ) -> list[dict]:
    """The optimizer's parameter groups (recog.finetune.parameter_groups): the model's at `lr` (its backbone at
    optim.backbone_lr_scale times it, by layer with optim.layer_decay), a sharded classifier's rows at `lr` in a
    group of their own, the loss's own parameters at `lr` × `loss_fn.lr_scale`. Each group keeps its `lr_scale`,
    which resuming re-applies."""
    return finetune.parameter_groups(model, loss_fn, lr, settings or GroupSettings())


def build_recipe(cfg: DictConfig, ctx: dist.Dist, data: TrainData, position: Position | None = None,
                 resuming: bool = False) -> StepRecipe:
    """The model (with weights= read by rank 0 only, its classifier and a proxy loss's proxies mapped by class name
    and new classes imprinted on every rank: recog.imprint), the loss, the optimizer over both at the LR scaled to the
    global batch (the loss's parameters at loss.lr_scale times it), warmup + cosine, the gradient scaler.
    `position`: where training stands, which the LR schedule follows when resuming (StepRecipe.position).
    `resuming`: a checkpoint will give the weights, so model.pretrained is not read (recog.pretrained)."""
    model = build_model(cfg, ctx, len(data.classes), resuming)
    model = parallel.prepare_model(model, cfg.perf, ctx.is_distributed)  # SyncBatchNorm, channels_last
    model.to(ctx.device)  # before the optimizer exists: its state must live where the parameters live
    loss_fn = build_loss(cfg, len(data.classes), ctx).to(ctx.device)
    normalize = Normalize(cfg.data.mean, cfg.data.std, ctx.device)
    if cfg.weights:  # rank 0 reads the file and hands it to every rank, where the classifier's new rows are imprinted
        weights = dist.run_on_rank0(partial(read_weights, cfg.weights), ctx, "reading model weights")
        images = partial(ShardRandomAccess, data.train_manifest, shard_source(cfg.data), instantiate(cfg.augment.test),
                         cfg.data.channels, decode_image) if data.train_manifest is not None else None
        start_from_weights(weights, cfg.weights, data.classes, model, loss_fn, images, cfg.imprint_images, cfg.seed,
                           ctx, normalize)
    if getattr(loss_fn, "cross_rank", False) and ctx.is_distributed:
        loss_fn.gather = dist.all_gather_with_grad

    steps_per_epoch = len(data.epochs)  # optimizer steps, whatever the world size
    global_batch, micro_batches = data.global_batch, data.layout["micro_batches"]
    lr = cfg.optim.lr * global_batch / cfg.optim.reference_batch  # linear scaling rule (Goyal et al., 2017)
    optimizer = instantiate(cfg.optim.optimizer)(parameter_groups(model, loss_fn, lr,
                                                                  GroupSettings.from_config(cfg.optim)), lr=lr)
    lr_factor = lr_schedule(cfg.schedule, steps_per_epoch, cfg.epochs)  # schedule.name: cosine or step
    frozen, tuning = cfg.model.get("freeze_backbone_epochs", 0), finetune.describe(cfg, len(optimizer.param_groups))
    if tuning and ctx.is_main:
        log.info("%s", tuning)
    own = sum(p.numel() for p in loss_parameters(loss_fn))
    mine = len(rank_micro_batches(micro_batches, ctx.rank, ctx.world_size))
    log.info("world size %d (%s on %s) | per-rank batch %d%s, global batch %d | %d steps per epoch, %d epochs | "
             "%s lr %.4g = %.4g x %d / %d%s | %s", ctx.world_size, ctx.backend or "single process", ctx.device,
             data.batch_size, f" x {mine} accumulated" if mine > 1 else "", global_batch,
             steps_per_epoch, cfg.epochs, type(optimizer).__name__, lr, cfg.optim.lr, global_batch,
             cfg.optim.reference_batch, f" (the loss's {own} parameters: x {loss_fn.lr_scale:g})" if own else "",
             cfg.perf.precision)
    return StepRecipe(model, optimizer, loss_fn, normalize,
                      LambdaLR(optimizer, lr_factor), parallel.grad_scaler(cfg.perf.precision, ctx.device),
                      partial(parallel.autocast, cfg.perf.precision, ctx.device), cfg.perf.channels_last,
                      ctx.device, lr, lr_factor, global_batch, position=position,
                      rounds=max(len(rank_micro_batches(micro_batches, r, ctx.world_size))
                                 for r in range(ctx.world_size)) if isinstance(loss_fn, ShardedLoss) else 0,
                      ema=build_ema(cfg.get("ema"), model),  # of the starting weights (weights= read above)
                      mixing=build_mixing(cfg.get("mixup"), len(data.classes), cfg.seed,
                                          rank_micro_batches(micro_batches, ctx.rank, ctx.world_size).start),
                      clip_grad_norm=cfg.optim.get("clip_grad_norm"),
                      freeze=BackboneFreeze(model.backbone, frozen) if frozen else None)
