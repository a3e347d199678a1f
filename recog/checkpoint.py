"""Checkpoints: written atomically by one rank, read safely (weights_only) by one rank."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from recog.errors import ConfigError


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it into place.

    A crash at any moment leaves either the old file or the new one, never half
    of one: the rename is atomic on POSIX file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f))


def _link_atomically(src: Path, dst: Path) -> None:
    """Make `dst` another name of `src` (a hard link: no second write), replacing `dst` atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    os.replace(tmp, dst)


def save_step_checkpoint(state: dict[str, Any], folder: str | Path, step: int, keep: int, is_best: bool) -> Path:
    """Write `step-NNNNNNNNN.pt`, point `last.pt` (and `best.pt` when `is_best`) at it, keep the newest `keep`."""
    folder = Path(folder)
    path = save_checkpoint(state, folder / f"step-{step:09d}.pt")
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


def write_json(data: dict, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load on CPU with weights_only=True: tensors and plain containers only, no arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; check the path given to resume= or model.weights=.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); "
                          "it may be truncated: use an earlier one.") from None
