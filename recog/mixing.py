"""mixup and cutmix (`mixup.alpha`, `mixup.cutmix_alpha` > 0): torchvision.transforms.v2's `MixUp` and `CutMix`
(a `RandomChoice` of the two when both are on) on each micro-batch of a training step, on the device, after
normalisation. The labels become probabilities (N × classes, rows summing to 1), which the loss's cross-entropy
takes as soft targets (recog/loss.py; label smoothing still applies).

Randomness. MixUp and CutMix draw from torch's global CPU generator (the Beta draw, the box, the choice), which
other code draws from too, and which a checkpoint saves from rank 0 alone (recog.checkpoint.RandomState). Rather
than make that generator's every use line up across a resume, each micro-batch's draws come from the global
generator seeded afresh from (seed, step, micro-batch) inside `torch.random.fork_rng`, which puts the generator's
state back afterwards: the draws depend on nothing but where training stands, so a resumed run makes the same ones
by construction (nothing to save), the rest of the run's randomness is untouched, and since the micro-batch is
the global one (recog.data.plan), the same images are mixed alike on any number of ranks.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from omegaconf import DictConfig
from torch.nn import functional as F
from torchvision.transforms import v2

log = logging.getLogger("recog")


class Mixing:
    """mixup and/or cutmix on a micro-batch: `(images, labels, step, micro_batch) -> (images, soft labels)`.

    `prob`: the share of micro-batches mixed (the others keep their images, their labels one-hot); `switch_prob`:
    with both on, the share of the mixed ones cut-mixed rather than mixed up. `first_micro_batch`: the global index
    of this rank's first micro-batch of a step (recog.data.plan.rank_micro_batches)."""

    def __init__(self, num_classes: int, alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, seed: int = 0, first_micro_batch: int = 0):
        self.num_classes, self.prob, self.seed, self.first = num_classes, prob, seed, first_micro_batch
        self.switch_prob = switch_prob
        mixes = []
        if alpha > 0:
            mixes.append(v2.MixUp(alpha=alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not mixes:
            raise ValueError("Mixing needs mixup.alpha or mixup.cutmix_alpha above 0")
        self.transform = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes, p=[1 - switch_prob, switch_prob])

    def __str__(self) -> str:
        names = {v2.MixUp: "mixup", v2.CutMix: "cutmix"}
        mixes = getattr(self.transform, "transforms", [self.transform])
        both = f" ({1 - self.switch_prob:g} / {self.switch_prob:g})" if len(mixes) > 1 else ""
        return " or ".join(f"{names[type(m)]} alpha {m.alpha:g}" for m in mixes) + both

    def seed_of(self, step: int, micro_batch: int) -> int:
        """The generator's seed for this rank's micro-batch `micro_batch` (from 0) of optimizer step `step`."""
        key = f"{self.seed}:{step}:{self.first + micro_batch}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1  # 63 bits: any seed torch takes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int, micro_batch: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`images` (N×C×H×W, normalised) and integer `labels` of optimizer step `step` (from 0), this rank's
        micro-batch `micro_batch` of it: the mixed images and their labels as probabilities."""
        with torch.random.fork_rng(devices=[]):  # the CPU generator only (every draw here is on the CPU)
            torch.default_generator.manual_seed(self.seed_of(step, micro_batch))
            if self.prob < 1 and torch.rand(()).item() >= self.prob:
                return images, F.one_hot(labels, self.num_classes).float()
            return self.transform(images, labels)


def build_mixing(cfg: DictConfig | None, num_classes: int, seed: int, first_micro_batch: int = 0) -> Mixing | None:
    """conf/train.yaml's `mixup:` section for `num_classes` classes (None: both alphas 0, or no section: off)."""
    if cfg is None or not (cfg.get("alpha") or cfg.get("cutmix_alpha")):
        return None
    mixing = Mixing(num_classes, float(cfg.get("alpha", 0.0)), float(cfg.get("cutmix_alpha", 0.0)),
                    float(cfg.get("prob", 1.0)), float(cfg.get("switch_prob", 0.5)), seed, first_micro_batch)
    log.info("mixing each micro-batch: %s (probability %g); soft targets", mixing, mixing.prob)
    return mixing
