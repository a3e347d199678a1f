"""Checkpoints: written atomically by one rank, read safely (weights_only) by one rank."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from recog.errors import ConfigError, RecogError


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


def write_json(data: dict, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def load_checkpoint(path: str | Path, option: str = "resume=") -> dict[str, Any]:
    """Load on CPU with weights_only=True: tensors and plain containers only, no arbitrary code.

    `option` is the setting the path came from, so that a message names what to fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; check the path given to {option}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # what went wrong, in our words: torch's advice (weights_only=False) would be unsafe
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
