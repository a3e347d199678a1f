"""Checkpoints: written atomically by one rank, read safely (weights_only) by one rank.

`Checkpoints` decides when rank 0 writes one (`save`), and puts a run back where one left it (`restore`, the
mirror of `save`); what one holds is the state of the components it is given (`Stateful`: the step recipe,
recog/step.py; the data position, recog/data/position.py; ...), each saved and restored by its own
`state_dict`/`load_state_dict`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from recog import classifier_files, dist
from recog.data.manifest import load_manifest
from recog.data.prepare import parse_class_names
from recog.data.source import is_remote
from recog.errors import ConfigError, RecogError
from recog.files import atomic_write, fsync_dir, is_plain_name

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


BEST_ROWS = "best.rows"  # a link to the folder of classifier rows that best.pt names (model.classifier=sharded)


def save_step_checkpoint(state: dict[str, Any], folder: str | Path, step: int, keep: int, is_best: bool,
                         rows: str | None = None) -> Path:
    """Write `step-NNNNNNNNN.pt`, point `last.pt` (and `best.pt` when `is_best`) at it, keep the newest `keep`.
    `rows`: the folder of a sharded classifier's rows this checkpoint names (already complete, beside it); the
    folders no kept checkpoint names (nor best.pt) are removed with their checkpoints."""
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
        if rows:
            tmp = folder / f".{BEST_ROWS}.tmp-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.symlink(rows, tmp)
            os.replace(tmp, folder / BEST_ROWS)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:  # last.pt and best.pt keep their own links
        old.unlink()
    remove_unnamed_rows(folder)
    fsync_dir(folder)
    return path


def remove_unnamed_rows(folder: Path) -> None:
    """Remove the folders of classifier rows that no step-*.pt and not best.pt names: those of removed checkpoints,
    and of a save cut short before its checkpoint was written."""
    named = {f"{path.stem}.rows" for path in folder.glob("step-*.pt")}
    if (folder / BEST_ROWS).is_symlink():
        named.add(os.readlink(folder / BEST_ROWS))
    for rows in folder.glob("step-*.rows"):
        if rows.name not in named:
            classifier_files.remove(rows)


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


CHECKPOINT_NAMES = ("checkpoints/best.pt", "checkpoints/last.pt", "best.pt", "last.pt")  # in a run folder, best first


def load_checkpoint(path: str | Path, option: str = "resume=") -> dict[str, Any]:
    """Load on CPU with weights_only=True: tensors and plain containers only, no arbitrary code.

    `option` is the setting the path came from, so that a message names what to fix.
    """
    path = Path(path)
    if path.is_dir():
        inside = next((name for name in CHECKPOINT_NAMES if (path / name).is_file()), None)
        fix = f"give a checkpoint file inside it, e.g. {path / inside}" if inside else \
            "give a checkpoint file written by train.py, e.g. outputs/<run>/checkpoints/best.pt"
        raise ConfigError(f"{path} is a folder, not a checkpoint; {fix} to {option}.")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a regular file (a device, FIFO or socket); give {option} a checkpoint "
                          "file written by train.py.")
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


def trained_class_names(ckpt: dict[str, Any], count: int) -> tuple[list[str] | None, str]:
    """The names of the `count` classes a checkpoint's classifier was trained on, in its row order, and where they
    were read: its "classes" (written since recog saves them), else its config's training shards' manifest (a
    local folder that still exists), else its data.prepare.class_names; (None, why) if none of them names
    `count` classes."""
    if len(ckpt.get("classes") or []) == count:
        return list(ckpt["classes"]), "checkpoint"
    data = (ckpt.get("config") or {}).get("data", {})
    train = data.get("train")
    if isinstance(train, str) and not is_remote(train) and "{" not in train:
        try:
            names = load_manifest(train, check_files=False).classes
            if len(names) == count:
                return names, f"manifest of {train}"
        except ConfigError:  # moved or deleted since training: try the next source
            pass
    names = parse_class_names((data.get("prepare") or {}).get("class_names"))
    if names and len(names) == count:
        return list(names), "data.prepare.class_names"
    return None, "no class names in the checkpoint, its training manifest or data.prepare.class_names"


class Stateful(Protocol):
    """What Checkpoints holds: a component that saves and restores its own state. Its `state_dict`'s keys are its
    own in the checkpoint (no two components share one); `load_state_dict` is given the whole checkpoint and
    takes its keys from it."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RandomState:
    """The random generators' state: torch's CPU generator, and the GPU's on a CUDA run."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return {"rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])


class ClassifierRows:
    """A sharded classifier's rows and their optimizer state (AdamW's exp_avg and exp_avg_sq, SGD's momentum_buffer:
    one value per row), which each rank holds its own slice of (model.classifier=sharded): every rank writes its
    slice into one folder beside the checkpoint (recog.classifier_files), and reads back the rows of this run's
    slice, whatever the world size that wrote them; no rank ever holds the whole classifier. Both are collective."""

    def __init__(self, classifier, optimizer: torch.optim.Optimizer, ctx: dist.Dist):
        self.classifier, self.optimizer, self.ctx = classifier, optimizer, ctx

    def tensors(self) -> dict[str, torch.Tensor]:
        rows = self.classifier.weight
        state = self.optimizer.state.get(rows, {})
        return {"weight": rows.detach(), **{name: value for name, value in state.items()
                                            if torch.is_tensor(value) and value.shape == rows.shape}}

    def save(self, folder: Path) -> None:
        """Every rank: its slice into `folder` (a folder of this step left by a save cut short is removed first),
        then rank 0 marks the folder complete; the checkpoint that names it is written after."""
        def remove_cut_short():
            if folder.exists():
                classifier_files.remove(folder)

        # rank 0 alone, and no rank writes before it is done (its failure, one sentence, stops every rank here)
        dist.run_on_rank0(remove_cut_short, self.ctx, "removing a classifier folder left by a save cut short")
        tensors, total = self.tensors(), self.classifier.num_classes
        dist.fail_together(lambda: classifier_files.write_slice(folder, tensors, self.classifier.classes, total),
                           self.ctx, "writing the classifier's rows")
        if self.ctx.is_main:
            classifier_files.finish(folder, total, tensors)

    @torch.no_grad()
    def restore(self, folder: Path) -> None:
        """This rank's rows (and their optimizer state) from `folder`, after the optimizer's state_dict was loaded."""
        classifier = self.classifier
        read = dist.fail_together(lambda: classifier_files.read_rows(folder, classifier.classes,
                                                                     total=classifier.num_classes),
                                  self.ctx, "reading the classifier's rows")
        rows = classifier.weight
        rows.copy_(read.pop("weight"))
        for name, value in read.items():
            self.optimizer.state[rows][name] = value.to(rows.device, copy=True)


class Checkpoints:
    """A dictionary of stateful components (the step recipe, the data position, the random generators, ...)
    whose states it writes into one checkpoint and puts back from one, in their order, never reaching inside
    them; beside them its own state (the last and best evaluation) and the run's config.

    Rank 0 writes one at the end of every epoch, and within epochs every `checkpoint.every_steps` steps and/or
    `checkpoint.every_minutes` minutes; the other ranks' components equal rank 0's after every step. Every rank
    decides at the same steps, because with a sharded classifier (`rows`) every rank holds rows of its own and
    writes them. The minutes are rank 0's clock: `minutes_up` is its flag, which the training loop exchanges with
    the stop flag (`StopOnSignal.agreed_with`), so that every rank learns it at the same step, one step after it
    was posted (posts go about once a second: dist.AnyRankFlag), and hands it to `save_if_due`."""

    def __init__(self, settings: DictConfig, folder: Path, is_main: bool, components: dict[str, Stateful],
                 config: dict[str, Any], classes: list[str] | None = None, rows: ClassifierRows | None = None):
        """`settings`: the config's checkpoint section; `config`: the run's whole resolved config, saved with
        every checkpoint; `classes`: the run's class names in label order, saved as "classes" (what weights=
        maps a classifier by, and exports name; `trained_class_names`); `rows`: a sharded classifier's, which
        every rank saves (then `save` is collective: every rank calls it at the same steps)."""
        self.folder, self.is_main, self.components, self.config = folder, is_main, components, config
        self.rows = rows
        self.classes = list(classes) if classes is not None else None
        self.keep, self.every_steps, self.every_minutes = settings.keep, settings.every_steps, settings.every_minutes
        self.best_top1, self.top1 = -1.0, float("nan")
        self.resumed_from: str | None = None  # the checkpoint `restore` put back
        self.last_step, self.last_time = -1, time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        state = {"top1": self.top1, "best_top1": self.best_top1, "config": self.config}
        if self.classes is not None:
            state["classes"] = self.classes
        for name, component in self.components.items():
            own = component.state_dict()
            if own.keys() & state.keys():
                raise ValueError(f"the state of {name} names {sorted(own.keys() & state.keys())}, which another "
                                 "part of the checkpoint holds")
            state.update(own)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for component in self.components.values():
            component.load_state_dict(state)
        self.top1, self.best_top1 = state["top1"], state["best_top1"]

    def save(self, step: int, top1: float = float("nan")) -> Path | None:
        """Rank 0 writes the checkpoint of optimizer step `step`. `top1`: the evaluation that ended an epoch; nan
        for a mid-epoch checkpoint."""
        is_best = top1 >= self.best_top1  # False for a mid-epoch checkpoint (nan)
        if is_best:
            self.best_top1 = top1
        self.top1 = top1
        if step == self.last_step:
            return None
        rows = None
        if self.rows is not None:  # every rank its slice, before rank 0's checkpoint names the folder
            rows = f"step-{step:09d}.rows"
            self.rows.save(self.folder / rows)
        self.last_step, self.last_time = step, time.monotonic()
        if not self.is_main:
            return None
        state = {**self.state_dict(), **({"classifier_rows": rows} if rows else {})}
        return save_step_checkpoint(state, self.folder, step, self.keep, is_best, rows)

    def minutes_up(self) -> bool:
        """Rank 0: `every_minutes` minutes have passed since the last save (by its clock: the other ranks' say
        nothing, so that every rank learns one answer)."""
        return bool(self.is_main and self.every_minutes and
                    time.monotonic() - self.last_time >= 60 * self.every_minutes)

    def save_if_due(self, step: int, minutes_up: bool = False) -> None:
        """Within an epoch, called by every rank after every step: a checkpoint every `every_steps` steps, and when
        `minutes_up` (rank 0's, as every rank learnt it: a step late under torchrun) unless a save came since the
        step before (an epoch's end; or this rule's own save, which rank 0's clock had not seen when it raised
        its flag again)."""
        due = (self.every_steps and step % self.every_steps == 0) or (minutes_up and self.last_step < step - 1)
        if due:
            self.save(step)

    def restore(self, found: tuple[str, dict] | None) -> None:
        """Put every component back as `save` wrote it (`found`: from `find_resume_point`); nothing for a fresh
        start."""
        if found:
            self.resumed_from, state = found
            self.load_state_dict(state)
            if self.rows is not None:
                self.rows.restore(self.rows_folder(Path(self.resumed_from), state))

    def rows_folder(self, path: Path, state: dict[str, Any]) -> Path:
        """The folder of classifier rows that the checkpoint at `path` names: a plain name beside it."""
        folder = classifier_rows_folder(path, state)
        if folder is None:
            raise ConfigError(f"{path} names no folder of sharded classifier rows beside it (it was not trained with "
                              "model.classifier=sharded); resume with the model.classifier it was trained with.")
        return folder


def classifier_rows_folder(path: Path, state: dict[str, Any]) -> Path | None:
    """The folder of a sharded classifier's rows that the checkpoint at `path` (read into `state`) names, beside it
    (the .pt's "classifier_rows", a plain name: `Checkpoints.save` writes step-N.rows beside step-N.pt, and best.pt
    and last.pt, links to one of them, name the same folder); None when it names none (a replicated classifier's
    checkpoint: its rows are model["class_weights"])."""
    name = state.get("classifier_rows")
    if name is None:
        return None
    if not is_plain_name(name):
        raise ConfigError(f"{path} names {str(name)[:80]!r} as its classifier rows' folder, which is not a plain name "
                          "beside it (recog follows no path a file names); give a checkpoint train.py wrote.")
    return Path(path).parent / name


def find_resume_point(settings: DictConfig, resume: str | None, run_dir: Path,
                      ctx: dist.Dist) -> tuple[str, dict] | None:
    """The checkpoint to continue from, read on rank 0 and handed to every rank.

    First this run directory's own newest readable checkpoint (a restarted or requeued run continues where it
    stopped, with no flag; `settings.auto_resume=false`, the config's checkpoint section, turns that off), else
    the file given as `resume=`, else none: a fresh start.
    """
    def read():
        if settings.auto_resume:
            found = load_newest_checkpoint(run_dir / "checkpoints", log)
            if found:
                return str(found[0]), found[1]
        return (str(resume), load_checkpoint(resume, "resume=")) if resume else None

    found = dist.run_on_rank0(read, ctx, "reading the checkpoint")
    if not found:
        return None
    path, ckpt = found
    lacking = {"best_top1", "config", "top1"} - set(ckpt)  # what Checkpoints writes into every one
    if lacking:
        raise ConfigError(f"{path} is not a recog training checkpoint (no {sorted(lacking)[0]}); "
                          "to start from plain weights use weights= instead of resume=.")
    return found


def check_resume_point(found: tuple[str, dict] | None, run_dir: Path, backbone: str,
                       mismatch: Callable[[dict], tuple[str, str] | None]) -> None:
    """That the checkpoint `found` fits this run's model (`backbone`) and loss: `mismatch` (StepRecipe.mismatch)
    says what of it does not. One sentence naming the fix if not; the same on every rank."""
    if not found:
        return
    path, ckpt = found
    wrong = mismatch(ckpt)
    if wrong and wrong[0] == "model":
        saved = ckpt["config"].get("model", {})
        own_run = Path(path).parent == run_dir / "checkpoints"
        fix = (f"this run directory ({run_dir}) belongs to that run: give a new hydra.run.dir, or the model "
               "settings it was trained with" if own_run else
               "resume with the model settings it was trained with, or start from its weights with weights= "
               "instead of resume=")
        raise ConfigError(f"{path} holds a {saved.get('backbone', 'different')} model that does not fit the "
                          f"{backbone} model of this run ({wrong[1]}); {fix}.")
    if wrong and wrong[0] == "optimizer":  # recog.finetune's groups: another grouping's optimizer state
        raise ConfigError(f"{path} was saved with other optimizer parameter groups ({wrong[1]}); resume with the "
                          "optim.backbone_lr_scale, optim.layer_decay and optim.no_weight_decay_norm_bias it was "
                          "saved with (its config holds them), or start from its weights with weights= instead of "
                          "resume=.")
    if wrong:  # a proxy loss's proxies against none, or proxies for another number of classes or dimensions
        raise ConfigError(f"{path} was trained with another loss (its state: {wrong[1]}); resume with the loss it "
                          "was trained with, or start from its weights with weights= instead of resume=.")
