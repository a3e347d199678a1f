"""An exponential moving average of the model's weights (`ema.decay` > 0), with timm's `ModelEmaV3`.

The training step updates it after every `ema.every`-th optimizer step (recog/step.py), on every rank: DDP keeps
the ranks' parameters equal, so every rank's average is the same with no collective of its own. It is evaluated at
each epoch's end beside the raw weights (eval/top1_ema), saved in checkpoints (`StepRecipe.state_dict`'s "ema":
the averaged model's state dict) and exported with `python -m recog.export CKPT OUT --ema`.

BatchNorm: ModelEmaV3 averages every floating-point entry of the state dict, the running mean and variance
included (its default, exclude_buffers=False: the statistics then follow the averaged weights' slow drift, as
timm's train.py has them), and copies the integer ones (num_batches_tracked). Each rank's model holds the running
statistics of its own batches, so each rank's averaged statistics differ a little, as the raw model's do: the
training loop gives every rank rank 0's before evaluating either (recog.dist.broadcast_buffers), and checkpoints
hold rank 0's.

timm is an optional extra (`pip install 'recog[timm]'`), imported only when the EMA is on.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig
from torch import nn

from recog.errors import ConfigError

log = logging.getLogger("recog")


class WeightsEma:
    """The averaged copy of `model` (`module`, made when this is built: build it once the model holds its starting
    weights) and when to update it. `update(model, steps)` after optimizer step `steps` (counted from 1): every
    `every` steps; ModelEmaV3's decay for that update count (0 at the first, so the average starts as a copy of
    the weights then; with `warmup`, 1 - (1 + n)^(-2/3), capped at `decay`, over the first updates)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, every: int = 1):
        try:
            from timm.utils import ModelEmaV3
        except ImportError:
            raise ConfigError(f"ema.decay={decay} averages the weights with timm's ModelEmaV3, and timm is not "
                              "installed; pip install 'recog[timm]', or set ema.decay=0.") from None
        self.every = every
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)

    @property
    def module(self) -> nn.Module:
        """The averaged model: a RecognitionModel like the trained one."""
        return self.ema.module

    def update(self, model: nn.Module, steps: int) -> None:
        """After optimizer step `steps` (from 1): fold `model`'s weights in, if this step is one of every `every`."""
        if steps % self.every == 0:
            self.ema.update(model, step=steps // self.every)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)


def build_ema(cfg: DictConfig | None, model: nn.Module) -> WeightsEma | None:
    """The EMA of conf/train.yaml's `ema:` section for `model` (None: ema.decay 0, or no section: off, timm not
    imported)."""
    if cfg is None or not cfg.get("decay"):
        return None
    ema = WeightsEma(model, float(cfg.decay), bool(cfg.get("warmup", False)), int(cfg.get("every", 1)))
    log.info("EMA of the weights: decay %g%s, every %d step(s); evaluated beside them (eval/top1_ema)", cfg.decay,
             " with warmup" if ema.ema.use_warmup else "", ema.every)
    return ema
