"""Every check of the configuration, and the values recog settles for `auto` from the data.

`check_config` runs on every rank before any process group exists, so a value that cannot work is one
sentence on every rank and no rank is left waiting in a collective: every check of a configured value that
does not need the data is there. The few that do (the shards' classes and samples against the sampler, the
global batch and the loss) are `check_against_data`, which `recog.build.build_data` runs on every rank once
the manifests are read. `settle_data_settings` returns what the `auto` data settings become, from what the
training shards' manifest says the images are; `DataSettings.write_into` puts them into the run's config.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from recog import parallel
from recog.backbones import pretrained_data_config, pretrained_source
from recog.data.decode import SCALED_DECODE_AVAILABLE
from recog.data.gpu_decode import GPU_DECODE_AVAILABLE
from recog.data.manifest import Manifest, missing_classes
from recog.data.photo import AUTO_AUGMENTS
from recog.data.plan import Mix, epoch_samples, ranks_without_samples
from recog.data.prepare import check_can_prepare
from recog.data.source import ShardSource
from recog.data.write import measure_shards
from recog.errors import ConfigError, check_number
from recog.finetune import check_finetune
from recog.model import CLASSIFIERS, check_backbone

# The numbers checked alike, each always a number: (key, whole number?, smallest allowed, strictly above it?).
# Numbers that may be `auto` or null, or matter only with another setting, are checked in check_config below.
NUMBERS = [
    ("epochs", True, 1, False), ("batch_size", True, 1, False), ("accumulate", True, 1, False),
    ("log_every", True, 1, False), ("seed", True, 0, False), ("eval.projector", True, 0, False),
    ("eval.every_steps", True, 0, False), ("eval.worst_classes", True, 0, False),
    ("eval.per_class_scalars", True, 0, False), ("eval.confusion_classes", True, 0, False),
    ("checkpoint.keep", True, 1, False), ("checkpoint.every_steps", True, 0, False),
    ("checkpoint.every_minutes", False, 0, False), ("schedule.warmup_epochs", False, 0, False),
    ("optim.lr", False, 0, False), ("optim.reference_batch", True, 1, False),
    ("data.shuffle_block", True, 1, False),
    ("data.http.retries", True, 0, False), ("data.http.backoff_s", False, 0, False),
    ("data.http.timeout_s", False, 0, True), ("dist.timeout_s", False, 0, True),
    ("dist.stop_check_s", False, 0, False),
    ("ddp.bucket_cap_mb", False, 0, True), ("loss.ce_weight", False, 0, False),
    ("loss.metric_weight", False, 0, False), ("loss.label_smoothing", False, 0, False),
    ("loss.arc_margin", False, 0, False), ("loss.lr_scale", False, 0, False),
]


SAMPLERS = ("stream", "pk")  # conf/sampler: what recog/build.py builds


def check_config(cfg: DictConfig) -> None:
    """Values that cannot work, each as one sentence. Runs on every rank before any process group exists:
    every check of a configured value that does not need the data is here (or called from here); those that
    need it are `check_against_data`."""
    check_data_folders(cfg.data, cfg.sampler.get("name"))
    for key, whole, least, above in NUMBERS:
        check_number(key, OmegaConf.select(cfg, key), whole, least, above)
    if cfg.data.num_workers != "auto":
        check_number("data.num_workers", cfg.data.num_workers, True, 0, False)
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
    check_values_per_channel(cfg.data)
    check_number("augment.flip", cfg.augment.flip, False, 0, False)
    if cfg.augment.flip > 1:
        raise ConfigError(f"augment.flip={cfg.augment.flip} is a probability; give a number from 0 to 1.")
    if cfg.augment.get("pad", "auto") != "auto":
        check_number("augment.pad", cfg.augment.pad, True, 0, False)
    check_photo_augment(cfg.augment)
    if cfg.sampler.get("name") not in SAMPLERS:
        raise ConfigError(f"sampler.name={cfg.sampler.get('name')} is unknown; use sampler=stream or sampler=pk.")
    pk = "p" in cfg.sampler  # P classes x K images per batch
    if pk:
        for key in ("sampler.p", "sampler.k"):
            check_number(key, OmegaConf.select(cfg, key), True, 1, False)
    check_backbone(cfg.model.backbone, cfg.model.get("small_input", False), cfg.model.get("pretrained", False))
    check_classifier(cfg)
    check_finetune(cfg)  # optim.backbone_lr_scale, layer_decay, ..., model.freeze_backbone_epochs, schedule.*
    cuda = torch.cuda.is_available() and cfg.dist.backend != "gloo"
    check_perf_config(cfg, cuda)
    check_decode(cfg.data, cuda)
    if cfg.loss.arc_margin >= 1.5:  # radians: at π/2 every target logit would be at most 0
        raise ConfigError(f"loss.arc_margin={cfg.loss.arc_margin} is an angle in radians; give one below 1.5 "
                          "(ArcFace uses 0.5, 0.2-0.3 suits small logit scales).")
    if cfg.loss.get("cross_rank") and not pk:
        raise ConfigError("loss.cross_rank=true needs equal batches on every rank; use sampler=pk.")
    if cfg.loss.get("cross_rank"):
        check_cross_rank_loss(cfg.loss)
    check_ema_and_mixup(cfg)
    if cfg.eval.gallery is not None and not cfg.eval.retrieval:
        raise ConfigError(f"eval.gallery={cfg.eval.gallery} is the gallery of the retrieval metrics, which are off; "
                          "add eval.retrieval=true, or leave eval.gallery out.")
    if cfg.global_batch is not None:
        check_number("global_batch", cfg.global_batch, True, 1, False)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    global_batch_micro_batches(cfg, world_size)
    check_can_prepare(cfg.data)


# model.classifier=auto picks sharded from this many training classes. Measured with bench/classes.py (2 gloo
# processes, CPU; bench/README.md "Many classes"): sharded's step against replicated's was 0.88 and 1.13 in two
# runs at 10,000 classes (no gain beyond this machine's noise), 0.58 and 0.82 at 100,000, 0.77 and 0.55 at
# 1,000,000, and its classifier + AdamW bytes are 1/W of replicated's at every size. At 100,000 classes × 512
# dims a replicated classifier is 800 MB per GPU (rows, gradient, AdamW) and a 200-MB all-reduce each step. Not
# yet measured on GPUs (NCCL): bench/gpu_session.sh has the check.
AUTO_SHARDED_CLASSES = 100_000


def check_classifier(cfg: DictConfig) -> None:
    """model.classifier and loss.sample_rate, and what a sharded classifier (recog.sharded) does not do yet: each
    refusal names the setting and the fix. auto is settled once the classes are known (`settle_classifier`)."""
    classifier = cfg.model.get("classifier", "replicated")
    if classifier not in (*CLASSIFIERS, "auto"):
        raise ConfigError(f"model.classifier={classifier} is unknown; use replicated (every process holds every "
                          "class's row), sharded (each holds a slice of them) or auto (sharded from "
                          f"{AUTO_SHARDED_CLASSES:,} classes).")
    rate = cfg.loss.get("sample_rate", 1.0)
    check_number("loss.sample_rate", rate, False, 0, True)
    if rate > 1:
        raise ConfigError(f"loss.sample_rate={rate} is the share of classes scored each step; give a number above 0 "
                          "and at most 1 (1: every class).")
    if classifier == "replicated" and rate != 1:
        raise ConfigError(f"loss.sample_rate={rate} samples the classes of a sharded classifier; add "
                          "model.classifier=sharded, or set loss.sample_rate=1.0.")
    refusal = sharded_refusal(cfg)
    if classifier == "sharded" and refusal:
        raise ConfigError(refusal)


def sharded_refusal(cfg: DictConfig) -> str | None:
    """Why model.classifier=sharded cannot train this config (one sentence naming the setting and the fix), or None."""
    refused = [
        (cfg.loss.get("cross_rank"), "loss.cross_rank=true gathers equal batches from every process, which the "
         "empty forward passes a sharded classifier makes a process do are not; set loss.cross_rank=false with "
         "model.classifier=sharded (each process mines its own batch), or use model.classifier=replicated."),
        (cfg.perf.compile, "perf.compile=true would compile the sharded classifier's collectives, which is not "
         "supported yet; set perf.compile=false with model.classifier=sharded."),
        (cfg.perf.precision == "fp16", "perf.precision=fp16 would let each process's gradient scaler skip a step "
         "for an overflow in its own rows alone, and the processes would part ways; use perf.precision=bf16 with "
         "model.classifier=sharded."),
        (ema_on(cfg), f"ema.decay={OmegaConf.select(cfg, 'ema.decay')} averages the model's weights, and a sharded "
         "classifier's rows live in the loss, outside the average; set ema.decay=0 with model.classifier=sharded, "
         "or use model.classifier=replicated."),
        (mixup_on(cfg), "mixup/cutmix (mixup.alpha, mixup.cutmix_alpha) train on soft targets, which a sharded "
         "classifier's loss does not take; set mixup.alpha=0 and mixup.cutmix_alpha=0 with model.classifier=sharded, "
         "or use model.classifier=replicated."),
        (cfg.optim.get("clip_grad_norm") is not None, f"optim.clip_grad_norm={cfg.optim.get('clip_grad_norm')} "
         "would clip each process's own norm, its rows of a sharded classifier being its own; set "
         "optim.clip_grad_norm=null with model.classifier=sharded, or use model.classifier=replicated."),
    ]
    return next((sentence for wrong, sentence in refused if wrong), None)


def check_photo_augment(augment: DictConfig) -> None:
    """augment=photo's own knobs (recog/data/photo.py)."""
    if "auto_augment" in augment and augment.auto_augment not in AUTO_AUGMENTS:
        raise ConfigError(f"augment.auto_augment={augment.auto_augment} is unknown; use trivial (TrivialAugmentWide), "
                          "rand (RandAugment) or none.")
    if "erase" in augment:
        check_number("augment.erase", augment.erase, False, 0, False)
        if augment.erase > 1:
            raise ConfigError(f"augment.erase={augment.erase} is a probability; give a number from 0 to 1.")


def ema_on(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "ema.decay", default=0))


def mixup_on(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "mixup.alpha", default=0) or
                OmegaConf.select(cfg, "mixup.cutmix_alpha", default=0))


def check_ema_and_mixup(cfg: DictConfig) -> None:
    """ema.* (recog/ema.py) and mixup.* (recog/mixing.py), and what mixup/cutmix's soft targets cannot train: each
    refusal one sentence naming the setting and the fix (model.classifier=sharded: `sharded_refusal`)."""
    for key in ("ema.decay", "mixup.alpha", "mixup.cutmix_alpha", "mixup.prob", "mixup.switch_prob"):
        value = OmegaConf.select(cfg, key, default=0.0)
        check_number(key, value, False, 0, False)
        bounded = key in ("ema.decay", "mixup.prob", "mixup.switch_prob")  # the alphas are Beta's: any above 0
        if bounded and (value > 1 or key == "ema.decay" and value == 1):
            raise ConfigError(f"{key}={value} is not valid; give a number from 0 to 1"
                              f"{' (below 1; 0: off)' if key == 'ema.decay' else ''}.")
    check_number("ema.every", OmegaConf.select(cfg, "ema.every", default=1), True, 1, False)
    if ema_on(cfg) and importlib.util.find_spec("timm") is None:
        raise ConfigError(f"ema.decay={cfg.ema.decay} averages the weights with timm's ModelEmaV3, and timm is not "
                          "installed; pip install 'recog[timm]', or set ema.decay=0.")
    if not mixup_on(cfg):
        return
    off = "or turn mixup off (mixup.alpha=0 mixup.cutmix_alpha=0)"
    if cfg.loss.arc_margin > 0:
        raise ConfigError(f"mixup/cutmix mix two classes into one target, and loss.arc_margin={cfg.loss.arc_margin} "
                          f"puts ArcFace's margin on a single target class; set loss.arc_margin=0, {off}.")
    if cfg.sampler.get("name") == "pk":
        raise ConfigError("mixup/cutmix blend the images of a batch, and sampler=pk's batches of P classes x K images "
                          f"are made for metric learning on unblended ones; use sampler=stream, {off}.")
    if cfg.loss.get("metric") is not None and cfg.loss.get("metric_weight", 0):
        raise ConfigError("mixup/cutmix give each image two classes, and the metric-learning term (loss.metric, "
                          f"weight {cfg.loss.metric_weight}) needs one class per image; use loss=ce, {off}.")


def settle_classifier(cfg: DictConfig, num_classes: int) -> str | None:
    """model.classifier=auto settled into `cfg` for `num_classes` training classes: sharded from
    AUTO_SHARDED_CLASSES on, unless the config holds something sharded does not do (then replicated, and the line
    says why). The same on every rank and on every resume: it depends on the config and the classes alone, not on
    the world size. Returns the line that tells the user (None: not auto)."""
    if cfg.model.get("classifier", "replicated") != "auto":
        return None
    refusal = sharded_refusal(cfg)
    if num_classes < AUTO_SHARDED_CLASSES:
        choice, why = "replicated", f"{num_classes:,} classes, under {AUTO_SHARDED_CLASSES:,}"
    elif refusal:
        choice, why = "replicated", f"{num_classes:,} classes, but not sharded: {refusal}"
    else:
        choice, why = "sharded", f"{num_classes:,} classes, at least {AUTO_SHARDED_CLASSES:,}"
    rate = cfg.loss.get("sample_rate", 1.0)
    if choice == "replicated" and rate != 1:
        if refusal and num_classes >= AUTO_SHARDED_CLASSES:  # sharded would be refused: its fix, or no sampling
            raise ConfigError(f"{refusal[:-1]}; or set loss.sample_rate=1.0 to train replicated "
                              f"(model.classifier=auto, {num_classes:,} classes).")
        raise ConfigError(f"loss.sample_rate={rate} samples the classes of a sharded classifier, and "
                          f"model.classifier=auto chose replicated ({why}); set model.classifier=sharded, or "
                          "loss.sample_rate=1.0.")
    cfg.model.classifier = choice
    return f"model.classifier=auto: {choice} ({why})"


def keep_resumed_classifier(cfg: DictConfig, state: dict) -> str | None:
    """model.classifier=auto on a resume: what the checkpoint's run settled it to (its config), not settled again,
    since a setting changed on the resume (perf.compile, say) could make auto pick the other classifier, whose
    checkpoint this is not. A setting the kept classifier refuses is its one sentence. Returns the line that tells
    the user (None: not auto, or a checkpoint that does not say, settled from the classes as on a first run)."""
    if cfg.model.get("classifier", "replicated") != "auto":
        return None
    chosen = ((state.get("config") or {}).get("model") or {}).get("classifier")
    if chosen not in CLASSIFIERS:
        return None
    cfg.model.classifier = chosen
    check_classifier(cfg)
    return f"model.classifier=auto: {chosen}, as the checkpoint it continues was trained"


def check_data_folders(data: DictConfig, sampler: str | None) -> None:
    """data.train and data.test (a folder, URL or brace pattern of shards, or a list of them) and data.mix (each
    training folder's share of an epoch)."""
    for key in ("train", "test"):
        if OmegaConf.is_missing(data, key):
            raise ConfigError(f"data.{key} is not set; give the folder of its shards, e.g. "
                              f"data.{key}=/data/shards/{key}.")
        value = data[key]
        if OmegaConf.is_list(value) and (not value or not all(isinstance(v, str) and v for v in value)):
            raise ConfigError(f"data.{key}={value} is not valid; give a folder of shards, or a list of folders, "
                              f"e.g. data.{key}=[/data/day1,/data/day2].")
    mix = data.get("mix")
    if mix is None:
        return
    folders = len(data.train) if OmegaConf.is_list(data.train) else 1
    if not OmegaConf.is_list(mix) or len(mix) != folders:
        example = ",".join(["1"] * folders)
        raise ConfigError(f"data.mix={mix} does not give one share for each of the {folders} folder(s) of "
                          f"data.train; give a list of {folders} share(s), e.g. data.mix=[{example}].")
    for share in mix:
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"data.mix holds {share}, but each share is the part of its folder an epoch reads; "
                              "give numbers above 0 and at most 1 (1: all of the folder).")
    if sampler == "pk":
        raise ConfigError("data.mix chooses part of each training folder for sampler=stream's epochs, but "
                          "sampler=pk draws its class-balanced batches from every sample; use sampler=stream with "
                          "data.mix, or leave data.mix out.")


def data_mix(data: DictConfig, train: Manifest) -> Mix | None:
    """data.mix for the training folders of `train` (their union), or None where every epoch reads all of them."""
    shares = data.get("mix")
    if shares is None or all(share >= 1 for share in shares):
        return None
    return Mix(tuple(train.shard_folders), tuple(float(share) for share in shares))


def folders_line(train: Manifest, test: Manifest, mix: Mix | None) -> str:
    """What the run reads, as one line: each training folder (its samples and classes, how many of them new), the
    union, what an epoch is made of (data.mix), and the test folders."""
    def folders(manifest: Manifest) -> str:
        known: set[str] = set()
        described = []
        for part in manifest.parts():
            own = part.manifest
            new = len(set(own.classes) - known) if known else 0
            known |= set(own.classes)
            described.append(f"{part.location} ({own.num_samples:,} samples, {own.num_classes} classes"
                             f"{f', {new} new' if new else ''})")
        whole = f": {manifest.num_samples:,} samples of {manifest.num_classes} classes" if len(described) > 1 else ""
        return " + ".join(described) + whole

    line = f"data.train: {folders(train)}"
    if mix is not None:
        parts, names = train.parts(), short_names([part.location for part in train.parts()])
        takes = [f"all {part.manifest.num_samples:,} of {name}" if share >= 1 else
                 f"{take:,} of {name}'s {part.manifest.num_samples:,} (mix {share:g})"
                 for part, name, share, take in zip(parts, names, mix.shares, mix.takes(train.shard_sizes))]
        line += f" | an epoch: {' + '.join(takes)} = {mix.epoch_samples(train.shard_sizes):,} samples"
    return f"{line} | data.test: {folders(test)}"


def short_names(locations: list[str]) -> list[str]:
    """Each folder's last path component, or the whole location where two would share it."""
    names = [location.rstrip("/").rsplit("/", 1)[-1] for location in locations]
    return names if len(set(names)) == len(names) else locations


def global_batch_micro_batches(cfg: DictConfig, world_size: int, saved: dict | None = None) -> tuple[int, int]:
    """The global batch (images per optimizer step, over all ranks) and the micro-batches it is cut into, each
    one forward pass of `batch_size` (sampler=pk: P×K) images. `global_batch` when given; else the global batch
    a checkpoint of this run was saved with (`saved`: its data position), so a run restarted on another number
    of ranks keeps its global batch, LR and epochs; else batch_size × world size × accumulate."""
    micro_batch = cfg.sampler.p * cfg.sampler.k if cfg.sampler.name == "pk" else cfg.batch_size
    what = "sampler.p x sampler.k" if cfg.sampler.name == "pk" else "batch_size"
    kept = (saved or {}).get("global_batch")
    if not cfg.global_batch and kept and (kept % micro_batch or kept // micro_batch < world_size):
        logging.getLogger("recog").warning(
            "the checkpoint's global batch %d cannot be split into forward passes of %s=%d over %d processes; "
            "this run's global batch is %d (the LR follows it), and its epoch starts again", kept, what,
            micro_batch, world_size, micro_batch * world_size * cfg.accumulate)
        kept = None
    global_batch = cfg.global_batch or kept or micro_batch * world_size * cfg.accumulate
    micro_batches = global_batch // micro_batch
    if global_batch % micro_batch:
        raise ConfigError(f"global_batch={global_batch} is not a multiple of {what}={micro_batch} (the images of one "
                          f"forward pass); give a multiple of it.")
    if micro_batches < world_size:
        raise ConfigError(f"global_batch={global_batch} is {micro_batches} forward pass(es) of {what}={micro_batch}, "
                          f"fewer than the {world_size} processes; give global_batch={micro_batch * world_size} or "
                          f"more, or a smaller {what}.")
    if cfg.loss.get("cross_rank") and micro_batches != world_size:
        raise ConfigError(f"loss.cross_rank=true gathers one batch per rank at each forward pass, but each step "
                          f"here has {micro_batches} batches of {what}={micro_batch} for {world_size} process(es) "
                          "(global_batch, accumulate, or a restart on fewer processes); set loss.cross_rank=false "
                          "or keep one batch per process and step.")
    return global_batch, micro_batches


def check_decode(data: DictConfig, cuda: bool) -> None:
    """data.decode and data.jpeg_scaled_decode. `cuda`: whether this run will train on GPUs (NCCL) rather than CPUs
    (gloo)."""
    scaled_decode = data.jpeg_scaled_decode
    if scaled_decode != "auto" and not isinstance(scaled_decode, bool):
        raise ConfigError(f"data.jpeg_scaled_decode={scaled_decode} is not valid; give true, false or auto.")
    if scaled_decode is True and not SCALED_DECODE_AVAILABLE:
        raise ConfigError("data.jpeg_scaled_decode=true needs simplejpeg, which is not installed here: "
                          "`pip install simplejpeg`, or set data.jpeg_scaled_decode=auto.")
    if data.decode not in ("cpu", "gpu"):
        raise ConfigError(f"data.decode={data.decode} is not valid; give cpu (in the loader workers) or gpu.")
    if data.decode == "cpu":
        return
    if not torch.cuda.is_available():
        raise ConfigError("data.decode=gpu needs a CUDA GPU, which this machine lacks; use data.decode=cpu.")
    if not cuda:
        raise ConfigError("data.decode=gpu decodes on the training GPU, but dist.backend=gloo trains on the CPU: use "
                          "data.decode=cpu, or dist.backend=nccl.")
    if not GPU_DECODE_AVAILABLE:
        raise ConfigError("data.decode=gpu needs TorchCodec, which is not installed here (or not for this torch): "
                          "`pip install torchcodec`, or use data.decode=cpu.")
    if scaled_decode is True:
        raise ConfigError("data.jpeg_scaled_decode=true asks the loader workers to decode, but data.decode=gpu "
                          "decodes on the GPU: leave data.jpeg_scaled_decode at auto, or use data.decode=cpu.")


def check_perf_config(cfg: DictConfig, cuda: bool) -> None:
    """`cuda`: whether this run will train on GPUs (NCCL) rather than CPUs (gloo)."""
    perf, ddp = cfg.perf, cfg.ddp
    if perf.precision not in parallel.PRECISIONS:
        raise ConfigError(f"perf.precision={perf.precision} is unknown; use one of {', '.join(parallel.PRECISIONS)}.")
    if perf.precision == "fp16" and not cuda:
        raise ConfigError("perf.precision=fp16 needs a GPU (its gradient scaler is CUDA's); on CPU use "
                          "perf.precision=bf16, which needs no scaler.")
    if perf.sync_bn and not cuda:
        raise ConfigError("perf.sync_bn=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); on CPU leave it "
                          "false.")
    if ddp.comm_hook not in parallel.COMM_HOOKS:
        raise ConfigError(f"ddp.comm_hook={ddp.comm_hook} is unknown; use null, fp16, bf16 or powersgd.")
    if ddp.comm_hook == "powersgd" and (ddp.powersgd_rank < 1 or ddp.powersgd_start_step < 2):
        raise ConfigError("ddp.powersgd_rank must be at least 1 and ddp.powersgd_start_step at least 2 (PowerSGD "
                          "needs a few plain all-reduces first).")


def check_values_per_channel(data: DictConfig) -> None:
    """data.mean and data.std hold one value per channel: in check_config where the config gives both, after
    settling (check_against_data) where data.channels was auto."""
    for key in ("mean", "std"):
        if "auto" not in (data.channels, data[key]) and len(data[key]) != data.channels:
            raise ConfigError(f"data.{key} has {len(data[key])} values for {data.channels} channel(s); give one "
                              f"per channel, or data.{key}=auto.")


def check_cross_rank_loss(loss: DictConfig) -> None:
    """loss.cross_rank=true mines over every rank's embeddings: for a loss with parameters of its own, every rank
    would compute the global batch's whole gradient for them, and DDP's average would be world size x it. Whether
    it has any does not depend on the number of classes: the loss is built with a stand-in one, and the random
    numbers its parameters drew are given back."""
    metric = loss.get("metric")
    stand_in = {"metric": {"num_classes": 2}} if metric is not None and "num_classes" in metric else {}
    with torch.random.fork_rng(devices=[]):
        built = instantiate(loss, **stand_in)
    if any(p.requires_grad for p in built.parameters()):
        raise ConfigError(f"loss.cross_rank=true mines over all ranks' embeddings, which does not work for a loss "
                          f"with parameters of its own ({type(built.metric).__name__}); set loss.cross_rank=false "
                          "(a proxy loss compares each embedding with the proxies, not with other embeddings).")


def check_against_data(cfg: DictConfig, train: Manifest, test: Manifest, gallery: Manifest | None,
                       micro_batches: int, world_size: int) -> None:
    """The checks of configured values that need the data (the shards' classes and samples), after the data
    settings are settled. Runs on every rank, on the same manifests, in recog.build.build_data. Classes are
    matched by name: the test split (and eval.gallery) may hold some of the training classes, not others."""
    for what, split in (("data.test", test), ("eval.gallery", gallery)):
        unknown = missing_classes(split.classes, train.classes) if split is not None else []
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ConfigError(f"{what} holds class {unknown[0]!r}{more}, which is not among the {train.num_classes} "
                              f"training classes of data.train; add a training folder that holds it to data.train, "
                              f"or leave it out of {what}.")
    check_values_per_channel(cfg.data)
    metric = cfg.loss.get("metric")
    if metric is not None and metric.get("num_classes", "auto") not in ("auto", train.num_classes):
        raise ConfigError(f"loss.metric.num_classes={metric.num_classes} but the training shards have "
                          f"{train.num_classes} classes; leave it at auto.")
    if cfg.sampler.name == "pk":
        p, k = cfg.sampler.p, cfg.sampler.k
        if p > train.num_classes:
            raise ConfigError(f"sampler.p={p} asks for more classes per batch than the {train.num_classes} of "
                              f"{cfg.data.train}; use sampler.p={train.num_classes} or fewer.")
        if p * k > train.num_samples:
            raise ConfigError(f"sampler.p={p} x sampler.k={k} is a batch larger than the {train.num_samples} "
                              f"training samples of {cfg.data.train}; make P x K smaller.")
        return
    mix = data_mix(cfg.data, train)
    samples = epoch_samples(train.shard_sizes, mix)
    empty = ranks_without_samples(samples, micro_batches, world_size)
    if empty:  # the same shards may train on 1 process and leave a rank of 2 with none
        raise ConfigError(f"{cfg.data.train} holds {samples} training sample(s){' an epoch (data.mix)' * bool(mix)}, "
                          f"fewer than the "
                          f"{micro_batches} micro-batches (forward passes of batch_size={cfg.batch_size}) the global "
                          f"batch of {micro_batches * cfg.batch_size} is split into over {world_size} processes, so "
                          f"rank {empty[0]} would have none; train on at most {samples} process(es) with a "
                          f"global_batch of at most {samples * cfg.batch_size}, or on more samples.")


SMALL_IMAGES = 64  # px: up to this (median shorter side), augment=auto picks the `small` preset, above `imagenet`
SMALLEST_AUTO_STD = 0.05  # data.std=auto: a channel's std (0..1 scale) below this is taken as this
LARGEST_AUTO_SIZE = 224  # image_size=auto never trains above this: ImageNet's size, what pretrained models expect


@dataclass(frozen=True)
class DataSettings:
    """What data.channels / image_size / mean / std and the augment config are, with no `auto` left, and the
    line that tells the user what was chosen and why."""

    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    augment: dict  # the augment config: augment=auto's chosen preset, pad=auto settled
    line: str

    def write_into(self, cfg: DictConfig) -> None:
        """Into the run's config, which is saved (.hydra, every checkpoint): an export reads them there."""
        with open_dict(cfg):
            cfg.data.channels, cfg.data.image_size = self.channels, self.image_size
            cfg.data.mean, cfg.data.std = self.mean, self.std
            cfg.augment = self.augment


def settle_data_settings(cfg: DictConfig, manifest: Manifest, source: ShardSource | None) -> DataSettings:
    """What every `auto` in data.channels / image_size / mean / std, and augment=auto, becomes: what the training
    manifest says the images are (measured on a sample now if the shards were written by another tool). The
    values the config gives are kept; `cfg` is left as it is."""
    data = cfg.data
    auto = [key for key in ("channels", "image_size", "mean", "std") if data[key] == "auto"]
    stats = manifest.stats
    if auto and not stats:
        stats = measure_shards(manifest, source)
    channels = stats["channels"] if "channels" in auto else data.channels
    # Pretrained weights: their config's mean/std, and its input size as the largest auto size (never upscaled:
    # 28-px images stay 28 px, 64x less compute than 224; larger photos come down to what the weights saw)
    pretrained = pretrained_settings(cfg.model, channels)
    image_size = (min(stats["height"]["median"], stats["width"]["median"],
                      pretrained["image_size"] if pretrained else LARGEST_AUTO_SIZE)
                  if "image_size" in auto else data.image_size)
    settled = {}
    for key in ("mean", "std"):
        if key in auto and pretrained:
            settled[key] = pretrained[key]
        elif key in auto:  # a grey data set read as RGB (channels=3) repeats its one value, and the reverse
            values = stats[key] * 3 if len(stats[key]) < channels else stats[key]
            settled[key] = [round(sum(values) / len(values), 4)] if channels == 1 else values[:3]
        else:
            settled[key] = list(data[key])
    if "std" in auto and not pretrained:  # a channel that hardly varies (solid colours) is not blown up into noise
        settled["std"] = [max(value, SMALLEST_AUTO_STD) for value in settled["std"]]
    chose = cfg.augment.name == "auto"
    if chose:
        augment = OmegaConf.to_container(cfg.augment["small" if image_size <= SMALL_IMAGES else "imagenet"],
                                         resolve=False)
        # the overrides given to augment=auto, for the knobs the chosen preset has (imagenet has no pad)
        augment.update({key: cfg.augment[key] for key in ("flip", "pad") if key in augment})
    else:
        augment = OmegaConf.to_container(cfg.augment, resolve=False)
    if augment.get("pad") == "auto":  # 4 px at 28-32 px, 1 at 8 px: the same share of the image
        augment["pad"] = max(1, round(image_size / 8))
    line = f"data: {channels} channel(s), {image_size} px, mean {settled['mean']}, std {settled['std']}"
    from_weights = [key for key in ("mean", "std") if key in auto] if pretrained else []
    from_images = [key for key in auto if key not in from_weights]
    if from_images:
        height, width = stats["height"], stats["width"]
        line += (f" ({', '.join(from_images)} from {stats['sampled']} images of {height['min']}-{height['max']} x "
                 f"{width['min']}-{width['max']} px)")
    if from_weights:
        line += (f" ({'/'.join(from_weights)} from the pretrained config of {cfg.model.backbone}"
                 f"{', size at most its ' + str(pretrained['image_size']) + ' px' if 'image_size' in auto else ''})")
    knobs = ", ".join(f"{key} {augment[key]}" for key in ("pad", "flip") if key in augment)
    line += f" | augment={augment['name']} ({knobs}){' for that size' if chose else ''}"
    return DataSettings(channels, image_size, settled["mean"], settled["std"], augment, line)


def pretrained_settings(model: DictConfig, channels: int) -> dict | None:
    """mean, std and image_size from the pretrained config of a timm backbone with model.pretrained set (None
    otherwise): what data.*=auto takes, so the images are normalised as the weights were trained."""
    if pretrained_source(model.get("pretrained", False)).kind == "none":
        return None
    return pretrained_data_config(model.backbone, channels)
