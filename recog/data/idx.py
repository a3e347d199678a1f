"""Read MNIST-format "idx" files (raw, .gz or .xz)."""

from __future__ import annotations

import gzip
import lzma
import zlib
from pathlib import Path

import numpy as np

from recog.errors import ConfigError

# The third byte of the magic number gives the element type.
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Return the array stored in an idx file, e.g. (N, 28, 28) uint8 images or (N,) labels."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"idx file {path} does not exist; point to an MNIST-format file (raw, .gz or .xz).")
    try:
        with _open(path) as f:
            raw = f.read()
    except (gzip.BadGzipFile, lzma.LZMAError, zlib.error, EOFError) as e:  # damaged, truncated, or not compressed
        raise ConfigError(f"{path} is not a readable {path.suffix} file ({e or type(e).__name__}); fetch it again, "
                          "or name it for what it is (raw idx files end in neither .gz nor .xz).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ConfigError(f"{path} is not an MNIST-format idx file (bad magic number); check the path.")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    body = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: header says {shape} but holds {body.size} values; fetch it again.")
    return body.reshape(shape)


def find_idx_pair(folder: str | Path, split: str) -> tuple[Path, Path]:
    """Locate the standard file names of an MNIST-style folder for split 'train' or 'test'."""
    folder = Path(folder)
    prefix = {"train": "train", "test": "t10k"}[split]
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [folder / f"{prefix}-{kind}{ext}" for ext in ("", ".gz", ".xz")]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            raise ConfigError(
                f"no {prefix}-{kind}[.gz|.xz] in {folder}; point to a folder holding the MNIST-format files "
                "(on Debian: apt-get install dataset-fashion-mnist)."
            )
        found.append(existing[0])
    return found[0], found[1]
