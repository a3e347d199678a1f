"""Checkpoints: written atomically by one rank, read safely (weights_only) by one rank.

`Checkpoints` decides when rank 0 writes one and what it holds (`save`), and puts a run back where one
left it (`restore`, the mirror of `save`); `Position` is where training stands.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from recog import dist
from recog.data.plan import count_done, mark_done
from recog.errors import ConfigError, RecogError
from recog.files import _fsync_dir, atomic_write
from recog.model import state_mismatch

if TYPE_CHECKING:  # the recipe's module imports this one
    from recog.build import StepRecipe

log = logging.getLogger("recog")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save through atomic_write. A failed write (a full disk) raises its OSError: torch's zip writer,
    closing after the failure, raises a RuntimeError of its own with the OSError hidden in its context."""
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except RuntimeError as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _link_atomically(src: Path, dst: Path) -> None:
    """Make `dst` another name of `src` (a hard link: no second write), replacing `dst` atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    os.replace(tmp, dst)


def save_step_checkpoint(state: dict[str, Any], folder: str | Path, step: int, keep: int, is_best: bool) -> Path:
    """Write `step-NNNNNNNNN.pt`, point `last.pt` (and `best.pt` when `is_best`) at it, keep the newest `keep`."""
    folder = Path(folder)
    path = folder / f"step-{step:09d}.pt"
    try:
        save_checkpoint(state, path)
    except OSError as e:  # a full disk, a quota, a read-only file system: nothing half-written is left
        raise RecogError(f"writing checkpoint {path} failed ({e.strerror or e}); the earlier checkpoints in "
                         f"{folder} are intact: free space there, or move the run directory, and run the same "
                         "command again to continue from them.") from None
    _link_atomically(path, folder / "last.pt")
    if is_best:
        _link_atomically(path, folder / "best.pt")
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:  # last.pt and best.pt keep their own links
        old.unlink()
    _fsync_dir(folder)
    return path


def load_newest_checkpoint(folder: str | Path, log) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `folder` that can be read, or None if there is none.

    One that cannot be read (cut short by a crash of the disk or the node, or damaged)
    is reported and left in place, and the one before it is tried.
    """
    paths = sorted(Path(folder).glob("step-*.pt"), reverse=True)
    for path in paths:
        try:
            return path, load_checkpoint(path)
        except ConfigError as e:
            log.warning("%s Trying the one before it.", e)
    if paths:
        raise ConfigError(f"none of the {len(paths)} checkpoints in {folder} can be read; move them away to "
                          "start this run over, or give resume= a good one.")
    return None


def load_checkpoint(path: str | Path, option: str = "resume=") -> dict[str, Any]:
    """Load on CPU with weights_only=True: tensors and plain containers only, no arbitrary code.

    `option` is the setting the path came from, so that a message names what to fix.
    """
    path = Path(path)
    if path.is_dir():
        inside = next((p for p in (path / "checkpoints" / "last.pt", path / "last.pt") if p.is_file()), None)
        raise ConfigError(f"checkpoint {path} is a folder; give {option} a checkpoint file"
                          + (f", e.g. {inside}." if inside else " (a run's checkpoints/last.pt or best.pt)."))
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; check the path given to {option}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # What went wrong, in our words (torch's advice, weights_only=False, would be unsafe). Only torch.load is
    # inside the try: its unpickler raises any type on a damaged file (IndexError, KeyError, EOFError, ...).
    except Exception as e:
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        if not zip_start:
            raise ConfigError(f"{path} is not a PyTorch checkpoint; give {option} a file written by recog or "
                              "torch.save.") from None
        if "Weights only load failed" in str(e):
            raise ConfigError(f"{path} holds Python objects besides tensors, which recog does not load (they "
                              "could run code); save the model's state_dict() instead and give that file to "
                              f"{option}") from None
        raise ConfigError(f"checkpoint {path} could not be read: it is damaged or cut short ({type(e).__name__}); "
                          f"give {option} an earlier one.") from None


@dataclass
class Position:
    """Where training stands: what a checkpoint records of it, besides the weights and optimizer state."""

    epoch: int = 0  # epochs finished (the one in progress, counted from 0)
    step: int = 0  # optimizer steps taken
    done: list[list[int]] = field(default_factory=list)  # steps of this epoch trained on: [start, stop) ranges
    batches_per_epoch: int = 0  # steps per epoch
    resumed_from: str | None = None  # the checkpoint this run continued from

    @property
    def mid_epoch(self) -> bool:
        return bool(self.done)

    @property
    def steps_done(self) -> int:
        return count_done(self.done)

    @property
    def schedule_step(self) -> int:
        """Where the LR schedule stands: the data trained on, in steps of this run's global batch. Equal to `step`
        in a run whose global batch never changed; after a resume with another global batch, `step` (what the
        checkpoints and TensorBoard count, never going back) still counts the old run's smaller or larger steps."""
        return self.epoch * self.batches_per_epoch + self.steps_done

    def mark_done(self, step: int) -> None:
        self.done = mark_done(self.done, step)

    def next_epoch(self) -> None:
        self.epoch, self.done = self.epoch + 1, []


class Checkpoints:
    """What a checkpoint holds, and when rank 0 writes one: at the end of every epoch, and within
    epochs every `checkpoint.every_steps` steps and/or `checkpoint.every_minutes` minutes. Rank 0
    decides alone (the time is its clock): saving needs nothing from the other ranks, whose model,
    optimizer and data position equal rank 0's after every step."""

    def __init__(self, cfg: DictConfig, ctx: dist.Dist, folder: Path, recipe: StepRecipe, layout: dict):
        self.folder, self.is_main, self.device, self.world_size = folder, ctx.is_main, ctx.device, ctx.world_size
        self.keep, self.every_steps, self.every_minutes = (cfg.checkpoint.keep, cfg.checkpoint.every_steps,
                                                           cfg.checkpoint.every_minutes)
        self.recipe = recipe
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.layout = layout  # what a mid-epoch data position is valid for
        self.best_top1, self.top1 = -1.0, float("nan")
        self.last_step, self.last_time = -1, time.monotonic()

    def save(self, position: Position, top1: float = float("nan")) -> Path | None:
        """`top1`: the evaluation that ended an epoch; nan for a mid-epoch checkpoint."""
        is_best = top1 >= self.best_top1  # False for a mid-epoch checkpoint (nan)
        if is_best:
            self.best_top1 = top1
        if not self.is_main or position.step == self.last_step:
            return None
        r = self.recipe
        state = {
            "model": r.model.state_dict(), "loss": r.loss_fn.state_dict(), "optimizer": r.optimizer.state_dict(),
            "scheduler": r.scheduler.state_dict(), "scaler": r.scaler.state_dict(), "epoch": position.epoch,
            "step": position.step, "data": {"done": position.done, "world_size": self.world_size, **self.layout},
            "top1": top1, "best_top1": self.best_top1, "config": self.config, "rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
        }
        path = save_step_checkpoint(state, self.folder, position.step, self.keep, is_best)
        self.last_step, self.last_time = position.step, time.monotonic()
        return path

    def maybe_save_mid_epoch(self, position: Position) -> None:
        if position.steps_done >= position.batches_per_epoch:  # the end-of-epoch checkpoint follows
            return
        due = (self.every_steps and position.step % self.every_steps == 0) or \
              (self.every_minutes and time.monotonic() - self.last_time >= 60 * self.every_minutes)
        if due:
            self.save(position)

    def restore(self, found: tuple[str, dict] | None, position: Position) -> Position:
        """Put the model, optimizer, scheduler, scaler, RNG and data position back as `save` wrote them (`found`:
        from `find_resume_point`); returns where training continues, `position` itself for a fresh start."""
        if not found:
            return position
        path, ckpt = found
        r = self.recipe
        r.model.load_state_dict(ckpt["model"])
        optimizer_state = ckpt["optimizer"]
        if "loss" in ckpt:
            r.loss_fn.load_state_dict(ckpt["loss"])
        elif r.loss_fn.state_dict():  # written before recog saved the loss: its parameters never trained then
            log.warning("%s holds no state of the loss (it was written before recog saved it): the loss's "
                        "parameters start fresh, the rest continues", path)
            optimizer_state = with_fresh_groups(optimizer_state, r.optimizer)
        scales = [group.get("lr_scale", 1.0) for group in r.optimizer.param_groups]  # this run's, kept
        r.optimizer.load_state_dict(optimizer_state)
        r.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            r.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        if "cuda_rng" in ckpt and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        self.best_top1, self.top1, self.last_step = ckpt["best_top1"], ckpt.get("top1", float("nan")), ckpt["step"]
        done, saved = position.done, ckpt.get("data", {})
        if saved.get("done") or any(saved.get("consumed", [])):  # "consumed": a position of recog before micro-batches
            if {key: saved.get(key) for key in self.layout} == self.layout and "done" in saved:
                done = [list(r) for r in saved["done"]]
            else:  # the steps of another global batch or batch size: not this run's
                log.warning("the mid-epoch data position in %s was saved with %s; this run has %s, so epoch %d "
                            "starts again from its first step", path, {k: saved.get(k) for k in self.layout},
                            self.layout, ckpt["epoch"] + 1)
        position = Position(ckpt["epoch"], ckpt["step"], done, position.batches_per_epoch, path)
        # This run's LR schedule, at this run's point in it: its peak LR differs from the checkpoint's if the global
        # batch changed, its length if the epochs or the global batch did (the steps of another global batch are
        # not this run's steps: the schedule goes by the data trained on, `schedule_step`).
        r.scheduler.base_lrs = [r.lr * scale for scale in scales]
        r.scheduler.last_epoch = position.schedule_step
        for group, scale in zip(r.optimizer.param_groups, scales):
            group["lr_scale"], group["lr"] = scale, r.lr * scale * r.lr_factor(position.schedule_step)
        r.scheduler._last_lr = [group["lr"] for group in r.optimizer.param_groups]  # what get_last_lr() says
        log.info("resumed from %s: step %d, %d epoch(s) done%s", path, position.step, position.epoch,
                 f" and {position.steps_done} of {position.batches_per_epoch} steps of epoch {position.epoch + 1}"
                 if position.mid_epoch else "")
        if saved.get("global_batch", self.layout.get("global_batch")) != self.layout.get("global_batch"):
            log.info("global batch changed from %d to %d: the LR schedule continues at its step %d (%d epoch(s) "
                     "of %d steps trained), not at the checkpoint's step %d", saved["global_batch"],
                     self.layout["global_batch"], position.schedule_step, position.epoch,
                     position.batches_per_epoch, position.step)
        if saved.get("world_size", self.world_size) != self.world_size:
            log.info("world size changed from %d to %d: the %d micro-batches of each step are read by %d rank(s) now; "
                     "the global batch, the LR schedule and the epoch's samples stay as they were",
                     saved["world_size"], self.world_size, self.layout.get("micro_batches", 0), self.world_size)
        return position


def with_fresh_groups(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state saved with fewer parameter groups (the model's only), with `optimizer`'s later groups
    (the loss's) added as they are now: no state yet. The model's parameters come first in both."""
    groups = optimizer.state_dict()["param_groups"]
    return {"state": saved["state"], "param_groups": saved["param_groups"] + groups[len(saved["param_groups"]):]}


def find_resume_point(cfg: DictConfig, run_dir: Path, ctx: dist.Dist, model=None,
                      loss_fn: torch.nn.Module | None = None) -> tuple[str, dict] | None:
    """The checkpoint to continue from, read on rank 0 and handed to every rank.

    First this run directory's own newest readable checkpoint (a restarted or requeued
    run continues where it stopped, with no flag; `checkpoint.auto_resume=false` turns
    that off), else the file given as `resume=`, else none: a fresh start. With `model`, every
    rank checks that it fits it and `loss_fn` (check_resume_point; the same answer everywhere:
    no rank is left waiting).
    """
    def read():
        if cfg.checkpoint.auto_resume:
            found = load_newest_checkpoint(run_dir / "checkpoints", log)
            if found:
                return str(found[0]), found[1]
        return (str(cfg.resume), load_checkpoint(cfg.resume, "resume=")) if cfg.resume else None

    found = dist.run_on_rank0(read, ctx, "reading the checkpoint")
    if not found:
        return None
    path, ckpt = found
    lacking = {"model", "optimizer", "scheduler", "epoch", "step", "best_top1", "rng"} - set(ckpt)
    if lacking:
        raise ConfigError(f"{path} is not a recog training checkpoint (no {sorted(lacking)[0]}); "
                          "to start from plain weights use weights= instead of resume=.")
    if model is not None:
        check_resume_point(cfg, run_dir, found, model, loss_fn)
    return found


def check_resume_point(cfg: DictConfig, run_dir: Path, found: tuple[str, dict] | None, model,
                       loss_fn: torch.nn.Module | None = None) -> None:
    """That the checkpoint `found` fits this run's `model` and `loss_fn`: one sentence naming the fix if not."""
    if not found:
        return
    path, ckpt = found
    problem = state_mismatch(model.state_dict(), ckpt["model"])
    if problem:
        saved = ckpt.get("config", {}).get("model", {})
        own_run = Path(path).parent == run_dir / "checkpoints"
        fix = (f"this run directory ({run_dir}) belongs to that run: give a new hydra.run.dir, or the model "
               "settings it was trained with" if own_run else
               "resume with the model settings it was trained with, or start from its weights with weights= "
               "instead of resume=")
        raise ConfigError(f"{path} holds a {saved.get('backbone', 'different')} model that does not fit the "
                          f"{cfg.model.backbone} model of this run ({problem}); {fix}.")
    problem = state_mismatch(loss_fn.state_dict(), ckpt["loss"]) if loss_fn is not None and "loss" in ckpt else None
    if problem:  # a proxy loss's proxies against none, or proxies for another number of classes or dimensions
        raise ConfigError(f"{path} was trained with another loss (its state: {problem}); resume with the loss it "
                          "was trained with, or start from its weights with weights= instead of resume=.")
