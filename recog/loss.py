"""Losses: tensors in, tensors out."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from recog.model import Output


class RecognitionLoss(nn.Module):
    """`ce_weight` × cross-entropy on the logits + `metric_weight` × a metric-learning loss on the embeddings.

    `metric` is any callable (embeddings, labels) -> scalar tensor, set in
    `conf/loss/` with Hydra's `_target_`; None (the default) trains on
    cross-entropy alone. With `cross_rank`, the metric term sees the whole
    global batch (every rank's embeddings), so negatives are mined across ranks.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metric_weight: float = 0.0,
        cross_rank: bool = False,
    ):
        super().__init__()
        self.ce_weight, self.label_smoothing = ce_weight, label_smoothing
        self.metric, self.metric_weight = metric, metric_weight
        self.cross_rank = cross_rank
        # With cross_rank, the training loop sets this to a function that concatenates a tensor over all
        # ranks, keeping the gradient of this rank's part (recog.dist.all_gather_with_grad).
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, output: Output, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(labels) == 0:  # a batch whose samples were all unreadable: zero loss, zero gradients
            return {"total": output.logits.sum() * 0.0}
        terms = {"ce": F.cross_entropy(output.logits, labels, label_smoothing=self.label_smoothing)}
        total = self.ce_weight * terms["ce"]
        if self.metric is not None and self.metric_weight:
            embeddings = output.embeddings
            if self.gather is not None:  # mine over the global batch (equal batch sizes on every rank)
                embeddings, labels = self.gather(embeddings), self.gather(labels)
            terms["metric"] = self.metric(embeddings, labels)
            # × ranks: each rank holds only its share of the gradient, and DDP averages the shares
            ranks = len(embeddings) // len(output.embeddings)
            total = total + self.metric_weight * terms["metric"] * ranks
        terms["total"] = total
        return terms


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
