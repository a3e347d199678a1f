"""An index folder read (written by `python -m recog.index build` and `add`): index.json, which names the version's
files, faiss's file of each shard, and the ids (each id's key and label). What a reader needs, and nothing of the
writer's or the servers': recog.index (the writer), recog.shard_server and recog.gallery import it.

Every file index.json names lies beside it (a plain name, never a path), and the ids are read without pickles.

Versions: each build or add writes generation G's changed files under new names (`*.gG.*`) and then replaces
index.json, so a reader sees one whole generation or the other. The writer keeps the previous generation's files
(index.json's `retired`) until the next commit, so a reader that read index.json a moment before a switch still
finds its files; a reader slower than two commits finds one gone (FileGone) and reads index.json again
(read_generation).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from recog.errors import ConfigError
from recog.files import is_plain_name

FORMAT = "recog-index/1"
INDEX_JSON = "index.json"
T = TypeVar("T")
# The most vectors a shard holds (index.json's shard_size) unless `build --shard-size` or `--shards` says
# otherwise: 10,000,000 IVF-SQ8 vectors of 128 dimensions are a 1.3 GB file, the most an `add` rewrites (the last
# shard), so a one-shard index stays one file until it is large. An index.json written before shard sizes existed
# reads as this size too.
DEFAULT_SHARD_SIZE = 10_000_000
READ_ATTEMPTS = 3  # index.json read again when a file it named vanished: each retry follows a newer commit


class FileGone(ConfigError):
    """A file index.json named is not there (any more): a newer generation was committed and the writer removed it,
    or the folder was damaged; read_generation tells the two apart."""


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("faiss is not installed; pip install 'recog[identify]' (faiss-cpu).") from None
    return faiss


def set_search_params(index, params: dict) -> None:
    faiss = import_faiss()
    for name, value in params.get("search", {}).items():
        faiss.ParameterSpace().set_index_parameter(index, name, value)


@dataclass
class IndexInfo:
    """What index.json says: the model, the width, the labels' names, the kind, and the files of this version."""

    folder: Path
    raw: dict

    @property
    def model_sha256(self) -> str:
        return self.raw["model_sha256"]

    @property
    def dim(self) -> int:
        return self.raw["dim"]

    @property
    def count(self) -> int:
        return self.raw["count"]

    @property
    def classes(self) -> list[str]:
        return self.raw["classes"]

    @property
    def identity(self) -> str:
        """16 hex digits of the sha256 of index.json: which index this is, and which of its generations (two
        folders of the same generation number differ in it, unless they hold the same files)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def generation(self) -> int:
        """Which version of the index this is: 0 when built, one more at each add (or build --overwrite)."""
        return self.raw["generation"]

    @property
    def sources(self) -> list[dict]:
        """The shard folders its items come from: {"identity", "location"} (recog.embeddings); empty for
        embeddings written by another tool."""
        return self.raw.get("sources", [])

    @property
    def shard_size(self) -> int:
        """The most vectors a shard holds: `add` fills the last shard up to it, then starts another."""
        return self.raw.get("shard_size", DEFAULT_SHARD_SIZE)

    @property
    def shard_counts(self) -> list[int] | None:
        """Each shard's number of vectors (None in an index.json written before they were recorded)."""
        return self.raw.get("shard_counts")

    def files(self) -> list[str]:
        return [*self.raw["shards"], self.raw["ids"]]

    def retired(self) -> list[str]:
        """The previous generation's files this one no longer uses: kept for readers of the previous index.json,
        removed by the next commit."""
        return self.raw.get("retired", [])


def read_index_info(folder: str | Path) -> IndexInfo:
    folder = Path(folder)
    path = folder / INDEX_JSON
    if not path.is_file():
        raise ConfigError(f"no {INDEX_JSON} in {folder}; give a folder written by python -m recog.index build.")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')}")
        info = IndexInfo(folder, raw)
        _ = (info.model_sha256, info.dim, info.count, info.classes, info.files(), raw["params"], raw["generation"])
        _ = [(s["identity"], s["location"]) for s in info.sources]
        if not isinstance(info.retired(), list):
            raise ValueError("retired is not a list")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a recog index description ({e}); build the index again.") from None
    # every file it names lies beside it: commit() removes an old version's files, open_gallery reads them
    outside = [name for name in info.files() + info.retired() if not is_plain_name(name)]
    if outside:
        raise ConfigError(f"{path} names {str(outside[0])[:80]!r}, which is not a plain file name inside {folder}, "
                          f"so it is not recog's; build the index into another folder, or move {path} away.")
    counts = info.shard_counts
    if type(info.shard_size) is not int or info.shard_size < 1 or (counts is not None and (
            len(counts) != len(info.raw["shards"]) or sum(counts) != info.count)):
        raise ConfigError(f"{path} is not a recog index description (its shard size or shard counts do not fit its "
                          f"{len(info.raw['shards'])} shard(s) of {info.count} vectors); build the index again.")
    return info


def read_ids(info: IndexInfo) -> tuple[np.ndarray, np.ndarray]:
    """The index's keys and labels (numbers and strings only: never a pickled object)."""
    path = info.folder / info.raw["ids"]
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys, labels = npz["keys"], npz["labels"]
    except FileNotFoundError:
        raise FileGone(f"{path} is missing; build the index in {info.folder} again.") from None
    except (OSError, ValueError, KeyError, EOFError) as e:  # missing, damaged, or arrays of objects (pickles)
        raise ConfigError(f"{path} cannot be read as the index's keys and labels ({str(e)[:80]}); build the index "
                          "again.") from None
    if keys.dtype.kind != "U" or labels.dtype.kind not in "iu" or keys.shape != labels.shape:
        raise ConfigError(f"{path} does not hold string keys and integer labels of one length; build the index "
                          "again.")
    return keys, labels


def read_shard(path: Path):
    faiss = import_faiss()
    if not path.is_file():
        raise FileGone(f"{path} is missing; build the index in {path.parent} again.")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:  # faiss reports a damaged file as a RuntimeError
        if not path.exists():  # removed between the look and the read
            raise FileGone(f"{path} is missing; build the index in {path.parent} again.") from None
        raise ConfigError(f"{path} is not a readable faiss index ({str(e).splitlines()[0][:80]}); build the index "
                          "again.") from None


def open_shard(info: IndexInfo, number: int):
    shard = read_shard(info.folder / info.raw["shards"][number])
    set_search_params(shard, info.raw["params"])
    return shard


def read_generation(folder: str | Path, read: Callable[[IndexInfo], T]) -> T:
    """`read(info)` of the index in `folder`: one whole generation. When a file its index.json named has vanished
    (a writer committed twice since, and removed it), index.json is read again and `read` starts over, up to
    READ_ATTEMPTS times; a file missing from the generation index.json still names is one sentence."""
    info = read_index_info(folder)
    for _ in range(READ_ATTEMPTS - 1):
        try:
            return read(info)
        except FileGone:
            newer = read_index_info(folder)
            if newer.generation == info.generation:  # not a commit: the folder lost a file
                raise
            info = newer
    return read(info)
