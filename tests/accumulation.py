"""Gradient accumulation (a step made of several micro-batches, `Batch.sizes`) against one step on the whole batch,
through recog's real training loop.

Used by test_parallel.py (one process) and dist_checks.py (2 processes under DDP, where the
non-final micro-batches run under no_sync). The model has no BatchNorm: BatchNorm's batch
statistics differ between 4 batches of 8 and one of 32, accumulation or not.
"""

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recog.data.loader import Batch
from recog.data.position import Position
from recog.log import NullWriter
from recog.loss import ModelWithLoss, RecognitionLoss
from recog.model import Output
from recog.step import StepRecipe
from recog.train import StepLog, train_one_epoch


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.classify = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, images):
        embeddings = torch.tanh(self.embed(images.flatten(1)))
        return Output(embeddings, self.classify(embeddings))


def one_optimizer_step(ctx, batch: Batch, global_batch: int) -> dict[str, torch.Tensor]:
    """Train TinyModel (seed 0) one step on `batch` (this rank's share of `global_batch`); return its weights."""
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss_fn = RecognitionLoss()
    trained = DistributedDataParallel(ModelWithLoss(model, loss_fn)) if ctx.is_distributed else None
    recipe = StepRecipe(model, optimizer, loss_fn, global_batch=global_batch, trained=trained)
    position = Position(batches_per_epoch=1)
    stats = train_one_epoch(recipe, [batch._replace(step=0)], position, StepLog(NullWriter(), every=10**6),
                            after_step=lambda position: False)
    assert stats.step == 1  # one optimizer step either way
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def accumulation_max_difference(ctx) -> float:
    """Largest weight difference between 4 accumulated batches of 8 and one batch of 32 (this rank's data)."""
    g = torch.Generator().manual_seed(100 + ctx.rank)
    images = torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (32,), generator=g)
    whole = one_optimizer_step(ctx, Batch(images, labels, 0), 32 * ctx.world_size)
    accumulated = one_optimizer_step(ctx, Batch(images, labels, 0, sizes=(8, 8, 8, 8)), 32 * ctx.world_size)
    return max((whole[k] - accumulated[k]).abs().max().item() for k in whole)
