"""How one optimizer step is taken (`StepRecipe.step`), and the state that carries from step to step (its
`state_dict`: model, loss, optimizer, LR schedule, gradient scaler).

The training loop calls `step` once per batch; `recog.build.build_recipe` makes a recipe from the config,
tests and benchmarks make one directly. recog/parallel.py holds the speed knobs it is given.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from recog import dist, parallel
from recog.data.loader import Batch
from recog.data.normalize import Normalize
from recog.data.position import Position
from recog.ema import WeightsEma
from recog.errors import DataError
from recog.finetune import BackboneFreeze
from recog.loss import ModelWithLoss
from recog.mixing import Mixing
from recog.model import state_mismatch
from recog.sharded import ShardedClassifier, keep_out_of_ddp, sharded_names


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """LR multiplier at optimizer step `step` (from 0): (step + 1) / `warmup_steps` over the first `warmup_steps`
    steps (1 at the last of them), then a cosine from 1 down toward `min_lr` (a fraction of the peak), which it
    reaches at step `total_steps` (one past a run's last step, so the last step trained keeps a small LR) and keeps
    beyond."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_lr + (1.0 - min_lr) * cosine if min_lr else cosine


def warmup_step(step: int, warmup_steps: int, milestones: tuple[int, ...], gamma: float, min_lr: float = 0.0
                ) -> float:
    """LR multiplier at optimizer step `step` (from 0): the same warmup as `warmup_cosine`, then 1, multiplied by
    `gamma` at each of the `milestones` (optimizer steps from the run's start) reached, never below `min_lr`
    (torchvision's reference recipes: MultiStepLR after a linear warmup)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(min_lr, gamma ** sum(step >= milestone for milestone in milestones))


def lr_schedule(schedule: DictConfig, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """The config's schedule (schedule.name, warmup_epochs, min_lr; for step: milestones in epochs from the run's
    start, gamma) as the LR multiplier at each optimizer step: what LambdaLR follows and a resume re-applies."""
    warmup, min_lr = round(schedule.warmup_epochs * steps_per_epoch), schedule.get("min_lr", 0.0)
    if schedule.get("name", "cosine") == "step":
        return partial(warmup_step, warmup_steps=warmup, gamma=schedule.gamma, min_lr=min_lr,
                       milestones=tuple(round(m * steps_per_epoch) for m in schedule.milestones))
    return partial(warmup_cosine, warmup_steps=warmup, total_steps=epochs * steps_per_epoch, min_lr=min_lr)


def _constant(step: int) -> float:
    return 1.0


class StepResult(NamedTuple):
    loss: torch.Tensor  # the batch's loss summed over its images (detached, where it lives)
    lr: float  # the LR this step was taken at (the first parameter group's)


@dataclass
class StepRecipe:
    """How one optimizer step is taken, besides the data, and what of it a checkpoint holds.

    Built by `build_recipe` from the config; tests and benchmarks build one directly from a model, a loss and
    an optimizer, the rest keeping plain defaults (fp32, no accumulation, a constant LR)."""

    model: nn.Module  # the model itself: saved, evaluated, exported (never DDP-wrapped)
    optimizer: torch.optim.Optimizer  # over the model's parameters and the loss's own, if it has any
    loss_fn: nn.Module  # (output, labels) -> {"total": loss, ...}; saved beside the model
    normalize: Callable[[torch.Tensor], torch.Tensor] = field(default_factory=lambda: Normalize([0.0], [1.0]))
    scheduler: LambdaLR | None = None  # stepped after every optimizer step (None: constant LR)
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # forward precision
    channels_last: bool = False
    device: torch.device = torch.device("cpu")
    lr: float = 0.0  # the peak LR (after scaling to the global batch), and its schedule: what resuming re-applies
    lr_factor: Callable[[int], float] = _constant
    global_batch: int = 0  # the batch of one optimizer step over all ranks, which the LR was scaled for (0: this
    # rank's batch is the whole step: each step's loss is its batch's mean)
    # What `step` calls, (images, labels) -> the loss's terms: model and loss as one module, DDP-wrapped (and
    # compiled) after distribute(), so the loss's parameters are kept equal on every rank as the model's are.
    trained: nn.Module | None = None  # None: ModelWithLoss(model, loss_fn)
    # Where training stands, which the LR schedule follows: load_state_dict re-applies this run's LR at its
    # schedule_step (restore the position first). None: at the step the saved schedule stood at.
    position: Position | None = None
    # A sharded classifier (recog.sharded) holds collectives in its forward and backward, so every rank makes the
    # same number of forward passes each step: this many (the most micro-batches a rank has), a rank with fewer
    # micro-batches or none making empty ones. 0: each rank makes one per micro-batch it holds (DDP's all-reduce,
    # on the last, is the step's only collective).
    rounds: int = 0
    ema: WeightsEma | None = None  # ema.decay > 0: the weights' moving average, updated after each optimizer step
    mixing: Mixing | None = None  # mixup.alpha / cutmix_alpha > 0: each micro-batch mixed, its labels soft
    clip_grad_norm: float | None = None  # the gradients' total norm clipped to this before each step (optim.*)
    freeze: BackboneFreeze | None = None  # the backbone frozen for the first epochs of `position` (recog.finetune)

    def __post_init__(self):
        self.trained = self.trained or ModelWithLoss(self.model, self.loss_fn)
        self.scheduler = self.scheduler or LambdaLR(self.optimizer, self.lr_factor)
        self.image_shape: tuple[int, ...] | None = None  # of the last batch: for a step with no image on a rank

    def step(self, batch: Batch) -> StepResult:
        """One optimizer step on one step's batch: forward and backward (`gradients`), the optimizer's step
        through the gradient scaler, zeroed gradients, the LR schedule's next step."""
        loss = self.gradients(batch)
        lr = self.head_lr()  # this step's: what train/lr shows at it
        if self.frozen():
            self.freeze.drop_gradients()  # all-reduced like any others (BackboneFreeze says why), then not used
        if self.clip_grad_norm is not None:  # (a sharded classifier's rows, per rank, are refused: recog.config)
            self.scaler.unscale_(self.optimizer)  # the true gradients, which the scaler's step then leaves as they are
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]
                                            if p.grad is not None], self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:  # every rank: DDP keeps the weights, and so their average, the same everywhere
            self.ema.update(self.model, self.steps_taken() + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(loss, lr)

    def gradients(self, batch: Batch) -> torch.Tensor:
        """Forward and backward over one step's batch, micro-batch by micro-batch (`batch.sizes`: one forward pass
        each, so BatchNorm sees the same images whatever the world size); DDP all-reduces on the last only (no_sync).
        Each image's loss is divided by a rank's share of the global batch: after DDP's average over the ranks
        every image weighs 1 / global_batch on any number of ranks, and a short batch counts for what it holds.
        Returns the batch's loss summed over its images (detached, where it lives)."""
        if self.freeze is not None:
            self.train_mode()
        sizes = list(batch.sizes or (len(batch.labels),))
        share = self.global_batch / dist.world_size() if self.global_batch else max(1, len(batch.labels))
        if self.rounds:
            return self._gradients_in_step(batch, sizes, share)
        last = max((i for i, n in enumerate(sizes) if n), default=None)
        if last is None:
            self._empty_step()
            return torch.zeros((), device=self.device)
        images, labels = self.inputs(batch)
        self.image_shape, total = tuple(images.shape[1:]), torch.zeros((), device=self.device, dtype=torch.float64)
        for i, (x, y) in enumerate(zip(images.split(sizes), labels.split(sizes))):
            if i > last or not len(y):
                continue
            if self.mixing is not None:  # mixed images, soft labels: drawn from (seed, step, micro-batch) alone
                x, y = self.mixing(x, y, self.steps_taken(), i)
            with parallel.no_sync(self.trained, sync=i == last):
                with self.autocast():
                    loss = self.trained(x, y)["total"]  # model and loss: one DDP module
                self.scaler.scale(loss * (len(y) / share)).backward()
            total = total + loss.detach().double() * len(y)
        return total

    def _gradients_in_step(self, batch: Batch, sizes: list[int], share: float) -> torch.Tensor:
        """`gradients` for a loss whose forward and backward hold collectives (`rounds`): every rank makes `rounds`
        forward and backward passes, in step with the others; one without images for it (no micro-batch left, or
        all unreadable) passes none through the model in eval mode (BatchNorm untouched) and the loss, times 0.
        DDP all-reduces on the last round on every rank."""
        if len(batch.labels):
            images, labels = self.inputs(batch)
            self.image_shape = tuple(images.shape[1:])
        elif self.image_shape is None:
            raise DataError("every sample of a rank's first batch was unreadable; the shards are damaged: "
                            "write them again.")
        else:
            images = torch.zeros((0, *self.image_shape), device=self.device)
            labels = torch.zeros(0, dtype=torch.int64, device=self.device)
        sizes = sizes + [0] * (self.rounds - len(sizes))
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, (x, y) in enumerate(zip(images.split(sizes), labels.split(sizes))):
            if not len(y):
                x = images.new_zeros((0, *self.image_shape))
                self.trained.eval()
            with parallel.no_sync(self.trained, sync=i == self.rounds - 1):
                with self.autocast():
                    loss = self.trained(x, y)["total"]
                self.scaler.scale(loss * (len(y) / share)).backward()
            self.train_mode()
            total = total + loss.detach().double() * len(y)
        return total

    def _empty_step(self) -> None:
        """No image for this rank this step (its micro-batches ran out, or all unreadable): it still joins the step's
        gradient all-reduce, with zero gradients (one image of zeros, its loss times 0, BatchNorm untouched)."""
        if self.image_shape is None:
            raise DataError("every sample of a rank's first batch was unreadable; the shards are damaged: "
                            "write them again.")
        self.trained.eval()
        with self.autocast():
            loss = self.trained(torch.zeros((1, *self.image_shape), device=self.device),
                                torch.zeros(1, dtype=torch.int64, device=self.device))["total"]
        self.scaler.scale(loss * 0.0).backward()
        self.train_mode()

    def frozen(self) -> bool:
        """The backbone frozen this step (model.freeze_backbone_epochs): it follows the position's epoch alone."""
        return self.freeze is not None and self.position is not None and self.freeze.frozen(self.position.epoch)

    def train_mode(self) -> None:
        """The training model in train mode, but a frozen backbone in eval mode (its BatchNorm statistics kept)."""
        self.trained.train()
        if self.frozen():
            self.freeze.hold()

    def head_lr(self) -> float:
        """The LR now, as train/lr and the progress line show it: the first parameter group's at lr_scale 1 (the
        model's, or with optim.backbone_lr_scale / layer_decay the head's), not a scaled backbone layer's."""
        groups = self.optimizer.param_groups
        return next((g["lr"] for g in groups if g.get("lr_scale", 1.0) == 1.0), groups[0]["lr"])

    def steps_taken(self) -> int:
        """Optimizer steps taken before this one: the position's (restored on resume), else the schedule's."""
        return self.position.step if self.position is not None else self.scheduler.last_epoch

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.normalize(batch.images.to(self.device, non_blocking=True))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, batch.labels.to(self.device, non_blocking=True)

    def distribute(self, ctx: dist.Dist, perf: DictConfig, ddp: DictConfig) -> None:
        """DDP (and torch.compile) around model + loss: every rank now holds rank 0's weights and loss parameters."""
        trained = ModelWithLoss(self.model, self.loss_fn)
        if sharded_names(trained):  # each rank's own rows of a sharded classifier: no broadcast, no average
            keep_out_of_ddp(trained)
        self.trained = parallel.wrap_model(trained, perf, ddp, ctx.is_distributed, ctx.device)

    def sharded_classifier(self) -> ShardedClassifier | None:
        """The loss's sharded classifier (model.classifier=sharded), whose rows and their optimizer state each rank
        saves apart (recog.checkpoint.ClassifierRows): `state_dict` leaves them out."""
        classifier = getattr(self.loss_fn, "classifier", None)
        return classifier if isinstance(classifier, ShardedClassifier) else None

    def _loss_state(self) -> dict:
        state = self.loss_fn.state_dict()
        if self.sharded_classifier() is not None:  # this rank's rows alone: saved apart
            state.pop("classifier.weight")
        return state

    def _optimizer_state(self) -> dict:
        state = self.optimizer.state_dict()
        classifier = self.sharded_classifier()
        if classifier is None:
            return state
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        index = next(i for i, p in enumerate(params) if p is classifier.weight)
        if index in state["state"]:  # keep what is not one value per row (AdamW's step), the same on every rank
            rows = classifier.weight
            state["state"] = {**state["state"], index: {k: v for k, v in state["state"][index].items()
                                                        if not (torch.is_tensor(v) and v.shape == rows.shape)}}
        return state

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "loss": self._loss_state(),
                "optimizer": self._optimizer_state(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        """Everything `state_dict` saved, then this run's LR schedule at this run's point in it: its peak LR
        differs from the checkpoint's if the global batch changed, its length if the epochs or the global batch
        did (the steps of another global batch are not this run's steps: the schedule goes by the data trained
        on, `Position.schedule_step`). Each parameter group keeps this run's `lr_scale`."""
        scales = [group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"], strict=self.sharded_classifier() is None)  # (`mismatch`)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:  # a checkpoint of a run without it: the average starts from the weights resumed
            self.ema.load_state_dict(state["ema"] if "ema" in state else self.model.state_dict())
        at = self.position.schedule_step if self.position is not None else self.scheduler.last_epoch
        self.scheduler.base_lrs = [self.lr * scale for scale in scales]
        self.scheduler.last_epoch = at
        for group, scale in zip(self.optimizer.param_groups, scales):
            group["lr_scale"], group["lr"] = scale, self.lr * scale * self.lr_factor(at)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() says

    def mismatch(self, state: dict) -> tuple[str, str] | None:
        """What of a saved state does not fit this recipe's model, loss or parameter groups, ("model", "loss" or
        "optimizer", how), else None:
        checked before `load_state_dict`, whose own error would be torch's."""
        for name, own in (("model", self.model.state_dict()), ("loss", self._loss_state())):
            problem = state_mismatch(own, state[name])
            if problem:
                return name, problem
        saved = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
        own = [len(group["params"]) for group in self.optimizer.param_groups]
        if saved != own:  # optim.backbone_lr_scale, layer_decay or no_weight_decay_norm_bias cut other groups
            return "optimizer", (f"its optimizer holds {len(saved)} parameter group(s) of {saved} parameters and "
                                 f"this run's {len(own)} of {own}")
        return None
