"""The files recog writes and the names it reads: atomic writes, plain names inside a folder, one writer per folder.

Every tool that writes into a folder goes through here, so that three promises hold everywhere:

- a reader sees the old file or the new one, never half of one (`atomic_write`: temp file, fsync, rename);
- a name read from a file (a manifest's shards, an index's files) is only ever a plain name inside that
  file's folder: never `..`, never absolute, never a path into another folder (`plain_name`);
- a folder has one writer at a time (`exclusive`): a second one gets one sentence, not interleaved files. The
  lock is the kernel's (flock), so a writer that was killed holds nothing.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path

from recog.errors import ConfigError

LOCK_FILE = ".recog.lock"  # in a folder a recog tool writes: held (flock) while it writes there


def fsync_dir(folder: Path) -> None:
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
    fsync_dir(path.parent)
    return path


def write_json(data: dict, path: str | Path) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def is_plain_name(name: object) -> bool:
    """A file name with no folder in it: not empty, not `.` or `..`, no `/` or `\\`, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def plain_name(name: object, described_in: str | Path, fix: str) -> str:
    """`name` if it is a plain file name (see is_plain_name), else one sentence: a file that names a path outside
    its own folder is refused, never followed. `described_in`: the file that gave the name; `fix`: what to do."""
    if not is_plain_name(name):
        raise ConfigError(f"{described_in} names {str(name)[:80]!r}, which is not a plain file name inside its "
                          f"folder; {fix}")
    return name


def disk_error(error: OSError, where: str | Path) -> ConfigError:
    """An OSError met while writing (a full disk, a read-only or vanished folder) as one sentence."""
    reason = error.strerror or str(error) or type(error).__name__
    full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    hint = "free some space or choose another folder" if full else "check the folder and its permissions"
    return ConfigError(f"cannot write to {where} ({reason}); {hint}.")


class FolderLock:
    """An exclusive hold on a folder for one writer (flock on `folder/.recog.lock`), released by `release`, at
    exit, or by the kernel when the process dies. `what` names the writer in the other writer's sentence."""

    def __init__(self, folder: str | Path, what: str):
        self.folder, self.what = Path(folder), what
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise ConfigError(f"{self.folder} is being written by {holder}; wait for it to finish, or choose "
                              f"another folder for this {what}.") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{what} (pid {os.getpid()})".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock; the file stays (removing it would race the next writer)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def exclusive(folder: str | Path, what: str) -> FolderLock:
    """Hold `folder` for one writer, or one sentence naming the writer that holds it: `with exclusive(d, "index
    add"): ...`."""
    return FolderLock(folder, what)
