"""One rank of test_sharded.py's real gloo runs: recog.sharded's ShardedClassifier under DDP against the replicated
classifier (RecognitionModel's cosine rows + RecognitionLoss) computed by one process on the whole global batch.

`run(rank, world_size, init_file, out)` (for torch.multiprocessing) writes out/rank<r>.json: for each case the
largest differences of the loss and of every gradient, and their sizes (so a check cannot pass on zeros); and
out/step<r>.pt: the weights after two steps of recog's StepRecipe, which test_sharded.py compares with one process.
"""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recog import sharded
from recog.build import parameter_groups
from recog.data.loader import Batch
from recog.loss import ModelWithLoss, RecognitionLoss
from recog.model import Output
from recog.sharded import ShardedClassifier, ShardedLoss, keep_out_of_ddp, top1_in_rounds
from recog.step import StepRecipe

FEATURES, DIM, SCALE = 6, 8, 16.0
# (classes, label smoothing, ArcFace margin, sample rate, rank 1 without images): 0.99 draws every row of a slice
# (ceil(0.99 × 3) = 3) through Partial FC's sampling code; 0.25 of 40 really leaves rows out.
CASES = [(7, 0.0, 0.0, 1.0, False), (10, 0.1, 0.0, 1.0, False), (10, 0.0, 0.5, 1.0, False),
         (7, 0.1, 0.5, 1.0, False), (10, 0.0, 0.0, 0.99, False), (40, 0.1, 0.5, 0.25, False), (7, 0.1, 0.5, 1.0, True)]


def batch_sizes(world_size: int, empty: bool = False) -> list[int]:
    """Uneven on purpose: 2, 3, 4, 2 images on ranks 0..3; with `empty`, none on rank 1."""
    return [0 if empty and r == 1 else 2 + r % 3 for r in range(world_size)]


def largest(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def global_batch(world_size: int, num_classes: int, empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(num_classes)
    n = sum(batch_sizes(world_size, empty))
    return torch.randn(n, FEATURES, generator=g), torch.randint(0, num_classes, (n,), generator=g)


class Net(nn.Module):
    """A tiny backbone, L2-normalised embeddings, and a classifier+loss: (inputs, labels) -> loss, as ModelWithLoss."""

    def __init__(self, classifier: nn.Module | None = None):
        super().__init__()
        self.backbone = nn.Linear(FEATURES, DIM)
        self.classifier = classifier

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.embeddings = F.normalize(self.backbone(x), dim=1)
        self.embeddings.retain_grad()
        return self.embeddings

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x), y)


def replicated(x, y, rows, loss_fn, own, columns=None):
    """One process, the whole global batch, RecognitionModel's logits and RecognitionLoss (mean over the batch: one
    rank holding the global batch). `columns`: the classes Partial FC scored, in order. Returns this rank's samples'
    loss (what the replicated loss returns on this rank), the embeddings' gradient, the backbone's, the rows'."""
    torch.manual_seed(1)
    net = Net()
    rows = rows.clone().requires_grad_(True)
    e = net.embed(x)
    logits = SCALE * e @ F.normalize(rows, dim=1).t()
    if columns is not None:
        logits, y = logits[:, columns], torch.searchsorted(columns, y)
    loss_fn(Output(e, logits), y)["total"].backward()
    mine = loss_fn(Output(e[own], logits[own]), y[own])["total"]
    return mine.detach(), e.grad, {k: p.grad for k, p in net.named_parameters()}, rows.grad


def check_case(rank, world_size, num_classes, smoothing, margin, sample_rate, empty) -> dict:
    x, y = global_batch(world_size, num_classes, empty)
    sizes = batch_sizes(world_size, empty)
    start = sum(sizes[:rank])
    own = slice(start, start + sizes[rank])
    rows = torch.randn(num_classes, DIM, generator=torch.Generator().manual_seed(7))
    loss_fn = RecognitionLoss(label_smoothing=smoothing, arc_margin=margin, logit_scale=SCALE)

    classifier = ShardedClassifier(num_classes, DIM, rank, world_size, SCALE, smoothing, margin, sample_rate, seed=3)
    classifier.load_rows(rows)
    torch.manual_seed(1)
    net = Net(classifier)
    keep_out_of_ddp(net)
    trained = DistributedDataParallel(net)
    share = len(x) / world_size  # recog's step: global_batch / world_size
    loss = trained(x[own], y[own])
    (loss * (sizes[rank] / share)).backward()

    columns = None
    if sample_rate < 1:
        drawn = [None] * world_size
        dist.all_gather_object(drawn, (classifier.sampled + classifier.classes.start).tolist())
        columns = torch.tensor(sorted(sum(drawn, [])))
    ref_loss, ref_embeddings, ref_backbone, ref_rows = replicated(x, y, rows, loss_fn, own, columns)
    mine = slice(classifier.classes.start, classifier.classes.stop)
    report = {
        "loss": abs(loss.item() - ref_loss.item()),
        "embeddings": largest(net.embeddings.grad - world_size * ref_embeddings[own]),
        "backbone": max((p.grad - ref_backbone[f"backbone.{k}"]).abs().max().item()
                        for k, p in net.backbone.named_parameters()),
        "rows": (classifier.weight.grad - ref_rows[mine]).abs().max().item(),
        "sizes": [ref_embeddings.abs().max().item(), ref_rows.abs().max().item(), ref_loss.item()],
    }
    if columns is not None:
        unsampled = torch.ones(len(classifier.classes), dtype=torch.bool)
        unsampled[classifier.sampled] = False
        held = y[(y >= mine.start) & (y < mine.stop)] - mine.start
        report["drawn"] = len(classifier.sampled)
        report["expected_drawn"] = min(len(unsampled), max(math.ceil(sample_rate * len(unsampled)), len(held.unique())))
        report["positives_drawn"] = bool(torch.isin(held, classifier.sampled).all())
        report["unsampled_grad"] = classifier.weight.grad[unsampled].abs().max().item() if unsampled.any() else 0.0

    # one SGD step: the backbone stays equal on every rank, the rows are each rank's own (the replicated step's)
    torch.optim.SGD(trained.parameters(), lr=0.5).step()
    backbones = [None] * world_size
    dist.all_gather_object(backbones, [p.detach().tolist() for p in net.backbone.parameters()])
    report["backbone_equal_after_step"] = all(b == backbones[0] for b in backbones)
    report["rows_after_step"] = (classifier.weight.detach() - (rows - 0.5 * ref_rows)[mine]).abs().max().item()
    report["all_rows_after_step"] = (classifier.all_rows() - (rows - 0.5 * ref_rows)).abs().max().item()
    return report


def check_top1(rank, world_size) -> dict:
    """Each rank's queries (3 + rank of them) against 10 classes whose row 8 repeats row 1 (a tie argmax gives to 1)
    and whose row 9 repeats row 4; some queries are those rows themselves."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(10, DIM, generator=g)
    rows[8], rows[9] = rows[1], rows[4]
    sizes = [3 + r for r in range(world_size)]
    queries = F.normalize(torch.randn(sum(sizes), DIM, generator=g), dim=1)
    queries[0], queries[-1] = F.normalize(rows[1], dim=0), F.normalize(rows[4], dim=0)
    classifier = ShardedClassifier(10, DIM, rank, world_size, SCALE)
    classifier.load_rows(rows)
    own = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    score, index = classifier.top1(queries[own])
    ref_score, ref_index = (SCALE * queries @ F.normalize(rows, dim=1).t()).max(dim=1)
    sharded.ROUND_LOGITS = 10 * world_size  # 1 to 3 images a round: the ranks' 3 + rank images take several rounds
    in_rounds = top1_in_rounds(classifier, queries[own])
    sharded.ROUND_LOGITS = 1 << 28
    return {"index": index.tolist(), "ref_index": ref_index[own].tolist(),
            "score": (score - ref_score[own]).abs().max().item(), "in_rounds": in_rounds.tolist()}


class TinyModel(nn.Module):
    """uint8 images (n × 1 × 2 × 3) -> Output: embeddings, and RecognitionModel's cosine logits when it holds the
    rows (`num_classes`), none (n × 0) for a sharded classifier."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Linear(FEATURES, DIM)
        self.class_weights = nn.Parameter(torch.empty(num_classes, DIM)) if num_classes else None

    def forward(self, images: torch.Tensor) -> Output:
        embeddings = F.normalize(self.embed(images.float().flatten(1)), dim=1)
        if self.class_weights is None:
            return Output(embeddings, embeddings.new_zeros(len(embeddings), 0))
        return Output(embeddings, SCALE * embeddings @ F.normalize(self.class_weights, dim=1).t())


STEP_CLASSES, STEP_PER_RANK = 7, 4


def step_data(world_size: int) -> Batch:
    """The global batch of the StepRecipe check: 4 images per rank, in rank order."""
    g = torch.Generator().manual_seed(5)
    n = STEP_PER_RANK * world_size
    images = torch.randint(0, 256, (n, 1, 2, 3), dtype=torch.uint8, generator=g)
    return Batch(images, torch.randint(0, STEP_CLASSES, (n,), generator=g), 0)


def step_rows() -> torch.Tensor:
    return torch.randn(STEP_CLASSES, DIM, generator=torch.Generator().manual_seed(9))


def recog_step(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Two optimizer steps of recog's own StepRecipe (momentum SGD, label smoothing and ArcFace's margin), each of
    2 micro-batches of 2 images on every rank (accumulated under DDP's no_sync), with DDP around the tiny model and
    the sharded loss: the model's weights and this rank's rows after them."""
    everything = step_data(world_size)
    mine = slice(rank * STEP_PER_RANK, (rank + 1) * STEP_PER_RANK)
    batch = Batch(everything.images[mine], everything.labels[mine], 0, sizes=(2, 2))
    classifier = ShardedClassifier(STEP_CLASSES, DIM, rank, world_size, SCALE, label_smoothing=0.1, arc_margin=0.5)
    classifier.load_rows(step_rows())
    model, loss_fn = TinyModel(), ShardedLoss(classifier)
    trained = ModelWithLoss(model, loss_fn)
    keep_out_of_ddp(trained)
    recipe = StepRecipe(model, torch.optim.SGD(parameter_groups(model, loss_fn, 0.5), lr=0.5, momentum=0.9),
                        loss_fn, global_batch=len(everything.labels), trained=DistributedDataParallel(trained))
    for _ in range(2):
        recipe.step(batch)
    return {"embed.weight": model.embed.weight.detach(), "embed.bias": model.embed.bias.detach(),
            "rows": classifier.weight.detach()}


def run(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))  # a hung collective fails the test
    try:
        report = {"cases": [check_case(rank, world_size, *case) for case in CASES],
                  "top1": check_top1(rank, world_size)}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
        torch.save(recog_step(rank, world_size), Path(out) / f"step{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # by hand: python tests/sharded_checks.py 3
    import sys
    import tempfile

    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, (int(sys.argv[1]), f"{tmp}/init", tmp), nprocs=int(sys.argv[1]))
        for r in range(int(sys.argv[1])):
            print(Path(tmp, f"rank{r}.json").read_text())
