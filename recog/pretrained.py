"""Building the model on every rank when model.pretrained names weights for a timm backbone: who reads them first.

- A local file: every rank reads it (DDP then hands rank 0's weights to all anyway); a missing file is one
  sentence on every rank (`dist.fail_together`), before the model is built.
- The Hub (model.pretrained=true or a Hub id): local rank 0 of each node builds first, filling the node's Hugging
  Face cache; the other ranks build after it, from that cache, so N processes do not download at once. A failed
  download (offline, nothing cached) is one sentence on every rank.
- A resume builds without pretrained weights: the checkpoint holds the trained ones, so neither the file nor the
  network is needed any more.
"""

from __future__ import annotations

from functools import partial

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from recog import dist
from recog.backbones import check_pretrained_file, pretrained_source
from recog.errors import RecogError
from recog.model import RecognitionModel


def build_model(cfg: DictConfig, ctx: dist.Dist, num_classes: int, resuming: bool = False) -> RecognitionModel:
    source = pretrained_source(cfg.model.get("pretrained", False))
    if source.kind == "none":
        return instantiate(cfg.model, num_classes=num_classes, in_channels=cfg.data.channels)
    make = partial(instantiate_model, cfg.model, num_classes=num_classes, in_channels=cfg.data.channels)
    if resuming:
        return make(pretrained=False)
    if not source.on_hub:
        dist.fail_together(partial(check_pretrained_file, cfg.model.pretrained), ctx, "reading model.pretrained")
        return make()
    first = ctx.local_rank == 0
    model = dist.fail_together(lambda: make() if first else None, ctx, "downloading the pretrained weights")
    return dist.fail_together(lambda: model if first else make(), ctx, "reading the pretrained weights")


def instantiate_model(spec: DictConfig, **kwargs) -> RecognitionModel:
    """Hydra's instantiate, with a sentence the model raised (a weights file that does not fit, a failed download)
    passed on as itself rather than inside Hydra's InstantiationException."""
    try:
        return instantiate(spec, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, RecogError):
            raise e.__cause__ from None
        raise
