"""Losses: tensors in, tensors out. `ModelWithLoss` is the model and its loss as the one module DDP wraps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from recog.errors import ConfigError
from recog.model import Output


class RecognitionLoss(nn.Module):
    """`ce_weight` × cross-entropy on the logits + `metric_weight` × a metric-learning loss on the embeddings.

    `metric` is any callable (embeddings, labels) -> scalar tensor, set in
    `conf/loss/` with Hydra's `_target_`; None (the default) trains on
    cross-entropy alone. A metric loss may have parameters of its own (a proxy
    loss's proxies): they are this module's, trained with the model's (see
    `ModelWithLoss`). With `cross_rank`, the metric term sees the whole
    global batch (every rank's embeddings), so negatives are mined across ranks.

    `arc_margin` > 0 adds ArcFace's additive angular margin (radians) to the
    model's cosine classifier: the target class's logit s·cos θ becomes
    s·cos(θ + m) in training (`additive_angular_margin`); `logit_scale` is
    the model's s. Evaluation reads the model's logits without it.

    `lr_scale`: the optimizer trains the loss's own parameters at this multiple
    of the model's LR (recog.build.parameter_groups).

    `sample_rate`: the share of classes scored each step (Partial FC), which only a
    sharded classifier draws (recog.sharded, built from these settings by
    recog.build.build_loss); the replicated classifier scores them all (1).
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metric_weight: float = 0.0,
        cross_rank: bool = False,
        arc_margin: float = 0.0,
        logit_scale: float = 16.0,
        lr_scale: float = 1.0,
        sample_rate: float = 1.0,
    ):
        super().__init__()
        if sample_rate != 1.0:
            raise ConfigError(f"loss.sample_rate={sample_rate} samples the classes of a sharded classifier; set "
                              "model.classifier=sharded, or loss.sample_rate=1.0.")
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing
        # a term weighted 0 is no term: its parameters, if any, would get no gradient (DDP fails on those)
        self.metric, self.metric_weight = (metric, metric_weight) if metric_weight else (None, 0.0)
        self.cross_rank = cross_rank
        self.arc_margin, self.logit_scale = arc_margin, logit_scale
        self.lr_scale = lr_scale  # the LR of the metric term's own parameters, as a multiple of the model's
        # With cross_rank on several ranks, recog.build.build_recipe sets this to a function that concatenates
        # a tensor over all ranks, keeping the gradient of this rank's own rows (recog.dist.all_gather_with_grad).
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def class_rows(self) -> dict[str, nn.Parameter]:
        """The loss's own parameters that hold one row per class, by their name in its state dict: a proxy loss's
        proxies (pytorch-metric-learning's ProxyAnchorLoss, ProxyNCALoss: `proxies`, num_classes × embedding
        width), which weights= maps by class name as it maps the model's classifier (recog.imprint). ArcFace
        (arc_margin) has none: its class rows are the model's classifier."""
        rows = {}
        for path, module in self.named_modules():
            proxies = module._parameters.get("proxies")
            if proxies is not None and proxies.dim() == 2 and proxies.shape[0] == getattr(module, "num_classes", None):
                rows[f"{path}.proxies" if path else "proxies"] = proxies
        return rows

    def cross_entropy(self, output: Output, labels: torch.Tensor) -> torch.Tensor:
        """The cross-entropy term on this rank's samples (their mean), from the model's logits; 0 for no samples, with a
        gradient to the logits. recog.sharded.ShardedLoss computes it from a sharded classifier instead, which is why
        `forward` calls it on every batch, empty ones too (that one's forward and backward hold collectives).
        `labels`: class indices (N,), or probabilities (N × classes: mixup/cutmix's soft targets, recog.mixing),
        which cross-entropy takes as they are, label smoothing applied on top (recog.config refuses them with the
        margin, which needs one target class)."""
        if len(labels) == 0:
            return output.logits.sum() * 0.0
        logits = output.logits.float()  # the loss in fp32 under bf16/fp16 autocast too
        if labels.dim() == 2:
            return F.cross_entropy(logits, labels.float(), label_smoothing=self.label_smoothing)
        if self.arc_margin:
            logits = additive_angular_margin(logits, labels, self.arc_margin, self.logit_scale)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def forward(self, output: Output, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = self.cross_entropy(output, labels)
        if len(labels) == 0:  # a batch whose samples were all unreadable (or a sharded run's empty forward pass): zero
            # loss, zero gradients for every parameter, the loss's own too: DDP waits for a gradient of each
            return {"total": sum((p.sum() for p in self.parameters()), ce) * 0.0}
        terms = {"ce": ce}
        total = self.ce_weight * ce
        if self.metric is not None:
            # fp32: pytorch-metric-learning casts its parameters to the embeddings' dtype, in place
            embeddings = output.embeddings.float()
            if self.gather is not None:  # mine over the global batch (equal batch sizes on every rank)
                embeddings, labels = self.gather(embeddings), self.gather(labels)
            terms["metric"] = self.metric(embeddings, labels)
            # × ranks: each rank holds only its share of the gradient, and DDP averages the shares
            ranks = len(embeddings) // len(output.embeddings)
            total = total + self.metric_weight * terms["metric"] * ranks
        terms["total"] = total
        return terms


def additive_angular_margin(logits: torch.Tensor, labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """ArcFace (Deng et al., 2019) on a cosine classifier's logits s·cos θ: the target class's becomes s·cos(θ + m).

    Where θ + m would pass π (cos(θ + m) rises again there), it is s·(cos θ − m·sin m) instead, which keeps the
    logit falling as θ grows (as insightface and pytorch-metric-learning's ArcFaceLoss do)."""
    target = labels[:, None]
    cos = (logits.gather(1, target) / scale).clamp(-1 + 1e-6, 1 - 1e-6)  # acos' slope is infinite at ±1
    theta = torch.acos(cos)
    shifted = torch.where(theta <= math.pi - margin, torch.cos(theta + margin), cos - margin * math.sin(margin))
    return logits.scatter(1, target, scale * shifted)


class ModelWithLoss(nn.Module):
    """The model and its loss as one module, (images, labels) -> the loss's terms: what DDP wraps.

    A loss with parameters of its own (a proxy loss's proxies) then has them broadcast from rank 0 when
    DDP starts and their gradients averaged with the model's after every step, so they stay the same on
    every rank, with no code of their own. The model's state_dict stays free of them: checkpoints save the
    loss's apart (under "loss"), and what weights= and exports read is the model alone.
    """

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.loss(self.model(images), labels)


class MinedLoss(nn.Module):
    """A metric-learning loss on the pairs or triplets a miner picks from the batch.

    `loss` and `miner` come from pytorch-metric-learning through Hydra, e.g.
    TripletMarginLoss + BatchHardMiner (batch-hard triplets), TripletMarginLoss +
    TripletMarginMiner(type_of_triplets=semihard), MultiSimilarityLoss +
    MultiSimilarityMiner; see conf/loss/.
    """

    def __init__(self, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, pairs)
