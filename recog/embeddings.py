"""The embeddings format: what an embedder writes and `python -m recog.index` reads.

A folder of parts, each written whole by one writer (so many ranks or machines can each write their own),
and a `manifest.json` written last, whose presence means the folder is complete:

    manifest.json     {"format": "recog-embeddings/1", "model_sha256": the export's checkpoint sha256 (model.json),
                       "dim": D, "dtype": "float16" | "float32", "count": N, "classes": [names of the labels],
                       "parts": [{"name": "part-00000", "count": n0}, ...],
                       "sources": [{"identity": the shard folder's identity, "location": where it was read}]}
    part-00000.npy    n0×D vectors, unit length, in `dtype`
    part-00000.npz    "keys": n0 strings, "labels": n0 int64 (-1: none)

A key names its sample across folders: `IDENTITY:KEY`, the shard folder's identity (recog.data.manifest
`shards_identity`: a hash of its shard list) and the sample's key in its shards, so that galleries grown from
many folders never hold two items of one name, and a service shows an item's image only from the shards it came
from. A part's name is a plain file name in the folder: a manifest naming anything else is refused.

Vectors are read part by part, a chunk at a time, memory-mapped: a reader's memory is bounded by a chunk.

`python -m recog.embed` writes one from a model and a folder of shards, each rank its own parts (at world size 1,
one process); this module is the format's home: its constants, its reader and the writers of its files.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recog.errors import ConfigError
from recog.files import atomic_write, plain_name, write_json

FORMAT = "recog-embeddings/1"
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")


def part_name(number: int, rank: int | None = None) -> str:
    """`part-NNNNN`; a distributed writer's parts carry their rank: `part-RRRRR-NNNNN`."""
    return f"part-{number:05d}" if rank is None else f"part-{rank:05d}-{number:05d}"


def write_part(folder: str | Path, name: str, vectors: np.ndarray, keys, labels) -> dict:
    """One part's two files, each atomically; returns its manifest entry."""
    folder = Path(folder)
    keys, labels = np.asarray(keys, dtype=str), np.asarray(labels, dtype=np.int64)
    if not len(vectors) == len(keys) == len(labels):
        raise ValueError(f"part {name}: {len(vectors)} vectors, {len(keys)} keys, {len(labels)} labels")
    atomic_write(folder / f"{name}.npy", lambda f: np.save(f, vectors))
    atomic_write(folder / f"{name}.npz", lambda f: save_npz(f, keys=keys, labels=labels))
    return {"name": name, "count": len(vectors)}


def save_npz(file, **arrays: np.ndarray) -> None:
    """np.savez, but the same arrays always give the same bytes (np.savez stamps each member with the time): a
    restarted writer ends with files identical to an uninterrupted one's."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def write_manifest(folder: str | Path, model_sha256: str, dim: int, dtype: str, parts: list[dict],
                   classes: list[str], sources: list[dict] = (), **extra) -> Path:
    """Last: once it is there, every part it lists is complete. `sources`: the shard folders embedded, each
    {"identity", "location"}; `extra`: what the writer adds for the record (readers ignore it)."""
    return write_json({"format": FORMAT, "model_sha256": model_sha256, "dim": dim, "dtype": dtype,
                       "count": sum(p["count"] for p in parts), "classes": list(classes), "parts": parts,
                       "sources": list(sources), **extra}, Path(folder) / MANIFEST)


def source_of(manifest, location) -> dict:
    """A shard folder as an embeddings manifest's `sources` lists it."""
    return {"identity": manifest.identity, "location": str(location)}


@dataclass(frozen=True)
class Chunk:
    start: int  # the id of the first vector: its position in the whole set
    vectors: np.ndarray  # float32, C-contiguous (what faiss takes)
    keys: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Embeddings:
    folder: Path
    model_sha256: str
    dim: int
    dtype: str
    count: int
    classes: list[str]
    parts: list[dict]
    sources: list[dict]  # the shard folders embedded: {"identity", "location"} (empty: written by another tool)

    def vectors(self, part: dict) -> np.ndarray:
        """A part's vectors, memory-mapped (nothing is read until used)."""
        path = self.folder / f"{part['name']}.npy"
        try:
            vectors = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} cannot be read ({e}); write the embeddings again.") from None
        if vectors.shape != (part["count"], self.dim):
            raise ConfigError(f"{path} holds {vectors.shape} vectors where {self.folder / MANIFEST} says "
                              f"({part['count']}, {self.dim}); write the embeddings again.")
        return vectors

    def keys_labels(self, part: dict) -> tuple[np.ndarray, np.ndarray]:
        path = self.folder / f"{part['name']}.npz"
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys, labels = npz["keys"], npz["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path} cannot be read ({e}); write the embeddings again.") from None
        if not len(keys) == len(labels) == part["count"]:
            raise ConfigError(f"{path} does not hold {part['count']} keys and labels as {self.folder / MANIFEST} "
                              "says; write the embeddings again.")
        return keys, labels

    def chunks(self, size: int = 65536) -> Iterator[Chunk]:
        """Every vector in id order, `size` at a time (and never across a part's end)."""
        start = 0
        for part in self.parts:
            vectors, (keys, labels) = self.vectors(part), self.keys_labels(part)
            for lo in range(0, part["count"], size):
                hi = min(lo + size, part["count"])
                yield Chunk(start + lo, np.ascontiguousarray(vectors[lo:hi], dtype=np.float32), keys[lo:hi],
                            labels[lo:hi])
            start += part["count"]

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """`n` vectors drawn at random without replacement (all of them if there are fewer), float32."""
        if n >= self.count:
            return np.concatenate([c.vectors for c in self.chunks()])
        chosen = np.sort(np.random.default_rng(seed).choice(self.count, n, replace=False))
        out, start = [], 0
        for part in self.parts:
            mine = chosen[(chosen >= start) & (chosen < start + part["count"])] - start
            out.append(np.asarray(self.vectors(part)[mine], dtype=np.float32))
            start += part["count"]
        return np.concatenate(out)


def open_embeddings(folder: str | Path) -> Embeddings:
    """Read and check a folder's manifest; every problem is one sentence."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ConfigError(f"no {MANIFEST} in {folder}; give a folder of embeddings (python -m recog.embed "
                          "writes one), or wait until its writer has finished.")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT or raw["dtype"] not in DTYPES:
            raise ValueError(f"format {raw.get('format')}, dtype {raw.get('dtype')}")
        emb = Embeddings(folder, str(raw["model_sha256"]), int(raw["dim"]), raw["dtype"], int(raw["count"]),
                         list(raw.get("classes") or []), [{"name": p["name"], "count": int(p["count"])}
                                                          for p in raw["parts"]],
                         [{"identity": str(s["identity"]), "location": str(s["location"])}
                          for s in raw.get("sources") or []])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a recog embeddings manifest ({e}); write the embeddings again.") from None
    for part in emb.parts:  # a part is a pair of files beside the manifest: never a path out of its folder
        plain_name(part["name"], path, "write the embeddings again.")
    if emb.count != sum(p["count"] for p in emb.parts):
        raise ConfigError(f"{path} counts {emb.count} vectors but its parts hold "
                          f"{sum(p['count'] for p in emb.parts)}; write the embeddings again.")
    return emb


def refuse_foreign_manifest(out: Path) -> None:
    """An embeddings writer's `out` may hold embeddings (its own to continue, or to refuse), never another kind of
    folder: a manifest.json of shards or of another tool there is one sentence, and is never replaced."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder for the embeddings.")
    path = out / MANIFEST
    if not path.exists():
        return
    try:
        kind = json.loads(path.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind == FORMAT:
        return
    what = "shards (python -m recog.data write)" if kind == "recog-shards/1" else "another tool's manifest.json"
    raise ConfigError(f"{out} holds {what}, not embeddings; choose another folder for the embeddings.")
