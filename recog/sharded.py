"""A classifier for millions of classes, its rows split across the ranks (Partial FC: An, Zhu et al., 2021,
arXiv 2010.05222): each rank holds `class_slice(rank, world_size, num_classes)` of the cosine classifier's rows,
and the cross-entropy over all classes is computed exactly from each rank's logits for its own rows.

One step, on every rank (N: the global batch, all ranks' embeddings; C_r: this rank's rows):

    all-gather the embeddings (N × D), with gradient          `_GatherRows`
    logits for this rank's rows only (N × C_r)                 never N × C anywhere
    the softmax normaliser: a MAX then a SUM over ranks        one all-reduce each
    the target logit, from the rank that holds the target      in the same SUM
    this rank's samples' mean cross-entropy                    what the replicated loss returns

Its rows are this rank's alone, so they must stay out of DDP (`keep_out_of_ddp`); the backbone stays in it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recog.dist import all_gather_rows, world_size
from recog.errors import ConfigError
from recog.loss import RecognitionLoss, additive_angular_margin

# Up to this many values (classes × embedding width; fp32: 128 MiB), a sharded classifier starts from the rows the
# replicated one would draw with the same seed (recog.build.build_loss: every rank draws them all and keeps its
# slice), so that the same seed gives the same run either way. Above it no rank draws the whole classifier: each
# draws its slice from (seed, rank). 1M classes × 32 dims fit; 1M × 64 do not.
SAME_START_VALUES = 1 << 25


def class_slice(rank: int, world_size: int, num_classes: int) -> range:
    """The classes (rows of the classifier) that `rank` holds: contiguous, in rank order; where `num_classes` does
    not divide, the first num_classes % world_size ranks hold one more (as torch.tensor_split splits). The one split
    of a classifier's rows: recog.classifier_files writes and reads its slices by it too."""
    if world_size < 1 or not 0 <= rank < world_size or num_classes < 0:
        raise ValueError(f"no classes for rank {rank} of world size {world_size} and {num_classes} classes")
    per, extra = divmod(num_classes, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def sample_rows(positives: torch.Tensor, rows: int, sample_rate: float, seed: int, step: int,
                rank: int) -> torch.Tensor:
    """Partial FC's rows for one step of one rank, sorted: every positive (the rows, 0..rows-1, of the global batch's
    classes this rank holds) and a random draw of its others, ceil(sample_rate × rows) rows in all (all the positives
    when they are more). The draw depends on (seed, step, rank) alone, so a resumed run draws what it would have."""
    count = min(rows, max(math.ceil(sample_rate * rows), len(positives)))
    state = np.random.SeedSequence((seed, step, rank)).generate_state(1, np.uint64)[0]
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(int(state) >> 1))
    taken = torch.zeros(rows, dtype=torch.bool)
    taken[positives.cpu()] = True
    others = order[~taken[order]][: count - len(positives)]
    return torch.cat([positives.cpu(), others]).sort().values


class _GatherRows(torch.autograd.Function):
    """Every rank's rows (any number on each), concatenated in rank order. Backward: the gradient of the gathered
    rows summed over the ranks (each rank's logits saw every rank's rows), this rank's part returned."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        gathered, start = all_gather_rows(local)
        ctx.rows = slice(start, start + len(local))
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows]


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over ranks, seen by every rank. Backward: the same sum of its gradient, since every
    rank's loss used the sum."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class _ScaleGradient(torch.autograd.Function):
    """The tensor itself; its gradient times `factor`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ShardedClassifier(nn.Module):
    """This rank's rows of a cosine classifier (`weight`, one row per class of `classes`), and the cross-entropy over
    all `num_classes` classes computed from them, exactly what RecognitionModel's classifier and RecognitionLoss
    give on the whole global batch (label smoothing and ArcFace's margin included).

    `forward(embeddings, labels)`: this rank's L2-normalised embeddings (n × D, n may differ between ranks, 0
    included) and their labels -> the mean cross-entropy of this rank's n samples (0 when n is 0), as the
    replicated loss returns on this rank. Every rank must call it together: it holds collectives, in backward too.

    Gradient scaling. recog's step backpropagates loss × n / share on each rank (share = global_batch /
    world_size), so the objective summed over ranks is J = (W / G) Σ_i ℓ_i over the G images of the global batch,
    and DDP's average over the W ranks makes each backbone weight's gradient (1/G) Σ_i ∂ℓ_i/∂θ. Here every rank's
    loss reaches every rank's logits through the all-reduced normaliser, whose backward sums the gradient over
    ranks, so each rank backpropagates all of J through its own rows:
      - embeddings: the all-gather's backward sums over ranks the gradient each rank's rows gave the gathered
        embeddings and returns this rank's part, (W/G) ∂ℓ_i/∂e_i for its own images, which is what the replicated
        loss gives them on this rank; DDP's average then makes the backbone's gradient the replicated one.
      - rows: J gives them (W/G) Σ_i ∂ℓ_i/∂w. Nothing averages them (they are not in DDP, and no other rank holds
        them), so they are scaled by 1/W here, giving (1/G) Σ_i ∂ℓ_i/∂w: the replicated classifier's gradient after
        DDP's average.

    `sample_rate` < 1 (Partial FC): each forward (the training loss, in train or eval mode alike, so that the ranks
    stay in step), each rank scores only the rows `sample_rows` draws (the
    global batch's classes it holds, and random others, seeded by (`seed`, `step`, rank)); the softmax then runs
    over the scored classes of all ranks (label smoothing's mean too). `step` is a buffer, counted up by each
    forward and saved with the rows, so an exact resume draws the same rows. A row not drawn gets a zero
    gradient, not None: the rows are one tensor, and a None would be all of it. With SGD without momentum or
    weight decay (Partial FC's setting, momentum aside) a row not drawn stays where it is; with momentum, weight
    decay or AdamW it still moves by its running state and decay, as in insightface's PartialFC_V2.
    `sampled` holds the last step's rows (this rank's numbering), for an optimizer that wants to skip the others.

    Evaluation reads `logits` (all of this rank's rows, no margin) or `top1`, the best class over all ranks.
    """

    def __init__(self, num_classes: int, embedding_dim: int, rank: int = 0, world_size: int = 1,
                 logit_scale: float = 16.0, label_smoothing: float = 0.0, arc_margin: float = 0.0,
                 sample_rate: float = 1.0, seed: int = 0):
        super().__init__()
        if num_classes < world_size:
            raise ConfigError(f"a sharded classifier of {num_classes} classes cannot give each of {world_size} ranks "
                              "a row; use model.classifier=replicated or fewer ranks.")
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"loss.sample_rate={sample_rate} is not in (0, 1]; 1 scores every class.")
        self.num_classes, self.world_size = num_classes, world_size
        self.rank, self.classes = rank, class_slice(rank, world_size, num_classes)
        self.logit_scale, self.label_smoothing, self.arc_margin = logit_scale, label_smoothing, arc_margin
        self.sample_rate, self.seed = sample_rate, seed
        # RecognitionModel's rows start the same way; each rank draws its own from (seed, rank). recog.build.build_loss
        # replaces them with RecognitionModel's own start where the whole classifier is small (SAME_START_VALUES).
        g = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, rank)).generate_state(1)[0]))
        self.weight = nn.Parameter(torch.randn(len(self.classes), embedding_dim, generator=g) * 0.01)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.sampled: torch.Tensor | None = None

    @torch.no_grad()
    def all_rows(self) -> torch.Tensor:
        """Every rank's rows in class order (num_classes × D), on every rank: what a checkpoint or an export would
        save, whatever the number of ranks. Every rank calls it."""
        return all_gather_rows(self.weight.detach())[0] if _distributed() else self.weight.detach().clone()

    @torch.no_grad()
    def load_rows(self, rows: torch.Tensor) -> None:
        """Take this rank's rows from the whole classifier's (num_classes × D, in class order): `all_rows` of a run
        on any number of ranks, or a replicated classifier's rows."""
        expected = (self.num_classes, self.weight.shape[1])
        if tuple(rows.shape) != expected:
            raise ConfigError(f"the classifier's rows have shape {tuple(rows.shape)} and this one needs {expected}; "
                              "start from weights of the same classes and model.embedding_dim.")
        self.weight.copy_(rows[self.classes.start: self.classes.stop])

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosines of `embeddings` with this rank's rows (n × rows), as RecognitionModel's logits."""
        return self.logit_scale * embeddings.float() @ F.normalize(self.weight.float(), dim=1).t()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ranks = world_size()
        if ranks != self.world_size:
            raise ConfigError(f"this sharded classifier was split for {self.world_size} ranks and runs on {ranks}; "
                              "build it for this world size.")
        local = len(labels)
        with torch.autocast(embeddings.device.type, enabled=False):  # the loss in fp32, as RecognitionLoss's
            if _distributed():
                gathered = _GatherRows.apply(embeddings.float())
                labels, first = all_gather_rows(labels)
            else:
                gathered, first = embeddings.float(), 0
            start, rows = self.classes.start, len(self.classes)
            held = (labels >= start) & (labels < self.classes.stop)
            target = (labels - start).clamp(0, rows - 1)  # meaningful where held
            weight = _ScaleGradient.apply(self.weight, 1.0 / ranks) if ranks > 1 else self.weight
            if self.sample_rate < 1.0:
                self.sampled = sample_rows(target[held].unique(), rows, self.sample_rate, self.seed, int(self.step),
                                           self.rank).to(weight.device)
                self.step += 1
                position = torch.full((rows,), -1, dtype=torch.int64, device=weight.device)
                position[self.sampled] = torch.arange(len(self.sampled), device=weight.device)
                target, weight = position[target].clamp(min=0), weight[self.sampled]  # every held target is drawn
            logits = self.logit_scale * gathered @ F.normalize(weight.float(), dim=1).t()  # N × this rank's rows
            if self.arc_margin:
                logits = torch.where(held[:, None],
                                     additive_angular_margin(logits, target, self.arc_margin, self.logit_scale), logits)
            return self._cross_entropy(logits, held, target)[first: first + local].sum() / max(local, 1)

    def _cross_entropy(self, logits: torch.Tensor, held: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each of the N gathered samples' cross-entropy over all ranks' scored classes, from this rank's logits:
        lse - (1 - ε) z_target - ε mean_c z_c (F.cross_entropy's label smoothing), every rank the same."""
        n, rows = logits.shape
        peak = logits.detach().max(dim=1).values
        if _distributed():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # a constant: the log-sum-exp does not depend on it
        picked = torch.where(held, logits.gather(1, target[:, None])[:, 0], logits.new_zeros(()))
        sums = torch.stack([(logits - peak[:, None]).exp().sum(dim=1), picked, logits.sum(dim=1),
                            logits.new_full((n,), float(rows))], dim=1)
        if _distributed():
            sums = _SumOverRanks.apply(sums)  # one all-reduce: normaliser, target logit, logit sum, classes scored
        exp_sum, picked, logit_sum, classes = sums.unbind(dim=1)
        eps = self.label_smoothing
        return peak + exp_sum.log() - (1 - eps) * picked - eps * logit_sum / classes

    @torch.no_grad()
    def top1(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best class over all ranks' rows for each of this rank's `embeddings` (any number per rank): its logit
        and its index in 0..num_classes-1, ties going to the lower index as argmax's do. Every rank calls it."""
        gathered, start = all_gather_rows(embeddings.float()) if _distributed() else (embeddings.float(), 0)
        score, index = self.logits(gathered).max(dim=1)  # the first of equal maxima: the lowest index here
        index = index + self.classes.start
        if _distributed():  # the highest score, then the lowest class index among the ranks that have it
            best = score.clone()
            dist.all_reduce(best, op=dist.ReduceOp.MAX)
            index = torch.where(score == best, index, torch.full_like(index, self.num_classes))
            dist.all_reduce(index, op=dist.ReduceOp.MIN)
            score = best
        return score[start: start + len(embeddings)], index[start: start + len(embeddings)]


# The most logits one round of `top1_in_rounds` holds on a rank (elements; fp32: 1 GiB): 1,024 images a rank
# at 8 ranks make 8,192 gathered rows, which at 10M classes on 8 ranks (1.25M rows each) would be 40 GiB.
ROUND_LOGITS = 1 << 28


@torch.no_grad()
def top1_in_rounds(classifier: ShardedClassifier, embeddings: torch.Tensor, per_round: int | None = None
                   ) -> torch.Tensor:
    """`classifier.top1`'s class for each of this rank's `embeddings` (any number, 0 included), at most `per_round`
    of them a round (None: 1,024, or fewer where the round's logits, (world size × per_round) × this rank's rows,
    would pass ROUND_LOGITS), so that evaluation's memory stays bounded however many images and classes there
    are. The ranks first agree on the number of rounds. Every rank calls it."""
    if per_round is None:  # from the largest slice: the same on every rank
        ranks, classes = classifier.world_size, classifier.num_classes
        per_round = max(1, min(1024, ROUND_LOGITS // (ranks * -(-classes // ranks))))
    rounds = torch.tensor([-(-len(embeddings) // per_round)], device=embeddings.device)
    if _distributed():
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    found = [classifier.top1(embeddings[i * per_round: (i + 1) * per_round])[1] for i in range(int(rounds))]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.int64, device=embeddings.device)


class ShardedLoss(RecognitionLoss):
    """RecognitionLoss with its cross-entropy term computed by a sharded classifier: (Output, labels) -> its terms
    ("ce", "metric" with a metric-learning term, "total"), the shape ModelWithLoss and recog's step (StepRecipe) call.
    The cross-entropy reads the output's embeddings only (a model for a sharded classifier holds no rows of its own);
    the metric term (`metric`, `metric_weight`: e.g. batch-hard triplets) is RecognitionLoss's, on this rank's
    embeddings. `lr_scale`: the metric term's own parameters' LR (a proxy loss's proxies) as a multiple of the
    model's; the rows train at the model's LR, as the replicated classifier's do (recog.build.parameter_groups).

    The classifier is called on every batch, an empty one too (RecognitionLoss.forward), since every rank must join
    its collectives; cross-rank mining (`gather`) is not supported, its gather needing equal batches on every rank,
    which a rank's empty forward passes are not (recog.config refuses loss.cross_rank)."""

    def __init__(self, classifier: ShardedClassifier, ce_weight: float = 1.0, lr_scale: float = 1.0,
                 metric=None, metric_weight: float = 0.0):
        super().__init__(ce_weight=ce_weight, metric=metric, metric_weight=metric_weight, lr_scale=lr_scale,
                         label_smoothing=classifier.label_smoothing, arc_margin=classifier.arc_margin,
                         logit_scale=classifier.logit_scale)
        self.classifier = classifier

    def cross_entropy(self, output, labels: torch.Tensor) -> torch.Tensor:
        return self.classifier(output.embeddings, labels)


def sharded_names(module: nn.Module) -> list[str]:
    """The names, in `module`, of every ShardedClassifier's rows and buffers."""
    names = []
    for path, sub in module.named_modules():
        if isinstance(sub, ShardedClassifier):
            own: Iterable = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
            names += [f"{path}.{name}" if path else name for name, _ in own]
    return names


def keep_out_of_ddp(module: nn.Module) -> list[str]:
    """Have DDP leave every ShardedClassifier in `module` alone: no broadcast of rank 0's rows when it starts (each
    rank holds other classes, maybe another number of them) and no average of their gradients (each rank's are
    already the whole gradient of its rows). Call before wrapping `module` in DDP; returns the names left out."""
    names = sharded_names(module)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names
