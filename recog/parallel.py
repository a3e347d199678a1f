"""How the model is trained in parallel and how fast: applied to the model from outside (the model itself
knows nothing of it). DDP and its options, gradient compression hooks, SyncBatchNorm, channels_last,
torch.compile, and the precision of the forward pass.

Knobs that change numerics are off by default (fp32, no compression, no SyncBatchNorm); the others keep
torch's defaults. A combination that cannot work fails in `recog.config.check_perf_config` with one sentence, before
any process group exists.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMM_HOOKS = (None, "fp16", "bf16", "powersgd")


def prepare_model(model: nn.Module, perf: DictConfig, distributed: bool) -> nn.Module:
    """Before the optimizer exists: SyncBatchNorm (it keeps the same parameters) and the memory format (`perf`:
    the config's perf section)."""
    if perf.sync_bn and distributed:
        model = prepare_sync_bn(model)
    if perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_sync_bn(model: nn.Module) -> nn.Module:
    """SyncBatchNorm for every BatchNorm of `model`. With timm loaded (a timm backbone), timm's converter: its
    BatchNormAct2d (EfficientNet, MobileNetV3, ...) holds its activation, which it keeps as SyncBatchNormAct, where
    torch's converter would make a plain SyncBatchNorm that never calls it; other BatchNorms it converts as torch's."""
    if "timm" in sys.modules:
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_model(model: nn.Module, perf: DictConfig, ddp: DictConfig, distributed: bool,
               device: torch.device) -> nn.Module:
    """The module the training loop calls: DDP (with its options and compression hook, the config's `ddp`
    section) when distributed, compiled when asked (`perf.compile`). DDP broadcasts rank 0's parameters and
    buffers here, so every rank starts equal."""
    trained = model
    if distributed:
        trained = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      bucket_cap_mb=ddp.bucket_cap_mb, static_graph=ddp.static_graph,
                      gradient_as_bucket_view=ddp.gradient_as_bucket_view)
        if ddp.comm_hook in ("fp16", "bf16"):
            hook = default_hooks.fp16_compress_hook if ddp.comm_hook == "fp16" else default_hooks.bf16_compress_hook
            trained.register_comm_hook(None, hook)
        elif ddp.comm_hook == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=ddp.powersgd_rank,
                                                start_powerSGD_iter=ddp.powersgd_start_step)
            hook = powerSGD_hook.powerSGD_hook
            trained.register_comm_hook(state, hook if device.type == "cuda" else one_bucket_at_a_time(hook))
    elif ddp.comm_hook:
        log.info("ddp.comm_hook=%s has nothing to compress with one process", ddp.comm_hook)
    if perf.compile:
        trained = torch.compile(trained)
    return trained


def one_bucket_at_a_time(hook):
    """A comm hook that finishes each bucket before DDP hands it the next.

    PowerSGD issues its second and third all-reduce of a bucket from a future's callback,
    which gloo runs on its own thread; with several buckets those interleave with the next
    bucket's first all-reduce in a different order on each rank, and gloo aborts the process
    ("collective mismatch", SIGABRT, nothing to catch). Waiting keeps the order the same on
    every rank, at the cost of overlapping communication with the backward pass. NCCL keeps
    the hook as it is.
    """
    def serial(state, bucket):
        future = hook(state, bucket)
        future.wait()
        return future

    return serial


def autocast(precision: str, device: torch.device):
    """The forward pass's precision (perf.precision): bf16/fp16 autocast, or nothing for fp32."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling (perf.precision); for fp32 and bf16 the scaler is a
    pass-through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def no_sync(model: nn.Module, sync: bool):
    """DDP's no_sync() for the micro-steps whose gradients stay local (accumulation), else nothing."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()
