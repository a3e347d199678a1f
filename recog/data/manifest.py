"""The manifest: what a folder of shards holds, written last so its presence means 'complete'."""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from recog.data.source import ShardSource, is_remote, join
from recog.errors import ConfigError
from recog.files import atomic_write, plain_name

MANIFEST = "manifest.json"
INDEX = "index.npz"  # per sample: shard, offset and size of the image in the tar, label, key (random access)
FORMAT = "recog-shards/1"
EMBEDDINGS_FORMAT = "recog-embeddings/1"  # recog.embeddings' manifest, also named manifest.json: told apart here


def shards_identity(shards: list[ShardInfo]) -> str:
    """A shard folder's identity: 16 hex digits of the sha256 of its shard list (names, sample counts, sizes and
    the shards' own sha256). The same shards give the same identity wherever they lie (a copy, an HTTP mirror);
    shards written again with other images give another. A sample's key is unique within its folder only, so a
    gallery item is named `identity:key` (`item_key`) across folders."""
    listed = [asdict(s) for s in shards]
    return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()[:16]


def item_key(identity: str, key: str) -> str:
    """A sample's name across folders: its folder's identity and its key there."""
    return f"{identity}:{key}"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int = 0
    sha256: str = ""


@dataclass(frozen=True)
class Manifest:
    shards: list[ShardInfo]
    classes: list[str]
    class_counts: list[int]  # of the whole folder, also when a pattern selects some of its shards
    root: str = field(default="", compare=False)  # the folder (path or URL) the shard names are relative to
    index: str = ""  # file name of the random-access index beside the manifest ("" if none)
    # what the images are, measured on a sample while writing (write.data_stats): channels, height and width
    # (min/median/max), per-channel mean and std. Empty for shards written before recog recorded it.
    stats: dict = field(default_factory=dict, compare=False)
    folder_identity: str = field(default="", compare=False)  # of the whole folder, when a pattern selects shards
    # A union of several folders (`union`): each folder's own manifest, where its shards start among these, and
    # the union label of each of its labels. Empty for one folder, whose shards' labels are the run's.
    folders: tuple[Folder, ...] = field(default=(), compare=False)

    @property
    def identity(self) -> str:
        """The identity of the folder these shards belong to (shards_identity of all of its shards); of a union,
        a digest of its folders' identities (a sample's `item_key` takes its own folder's: `folder_of`)."""
        if self.folders:
            joined = "+".join(f.manifest.identity for f in self.folders)
            return hashlib.sha256(joined.encode()).hexdigest()[:16]
        return self.folder_identity or shards_identity(self.shards)

    def parts(self) -> tuple[Folder, ...]:
        """The folders these shards come from: a union's, or this manifest as the one folder."""
        if self.folders:
            return self.folders
        return (Folder(self, 0, tuple(range(len(self.classes))), self.root),)

    def folder_of(self, shard: int) -> Folder:
        """The folder shard `shard` (an index into `shards`) belongs to."""
        parts = self.parts()
        return parts[bisect_right([f.first for f in parts], shard) - 1]

    @property
    def shard_folders(self) -> list[int]:
        """For each shard, the position of its folder in `parts()`."""
        return [i for i, f in enumerate(self.parts()) for _ in range(len(f.manifest.shards))]

    def relabel(self, shard: int) -> tuple[int, ...] | None:
        """The run's label of each of shard `shard`'s own labels (what its folder's manifest numbers them);
        None where they are the run's labels already (one folder)."""
        return self.folder_of(shard).labels if self.folders else None

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shard_sizes(self) -> list[int]:
        return [s.samples for s in self.shards]

    def url(self, shard: int) -> str:
        root = self.folder_of(shard).manifest.root if self.folders else self.root
        return join(root, self.shards[shard].name)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "num_samples": self.num_samples,
            "classes": self.classes,
            "class_counts": self.class_counts,
            "shards": [asdict(s) for s in self.shards],
            "index": self.index,
            "stats": self.stats,
        }


@dataclass(frozen=True)
class Folder:
    """One folder of a union (`union`): its own manifest (its shards, classes and labels as written), where its
    shards start in the union's shard list, and the union label of each of its own labels."""

    manifest: Manifest
    first: int  # its first shard's position in the union's shards
    labels: tuple[int, ...]  # labels[own label] = the union's label
    location: str  # as given: a folder, URL or brace pattern

    @property
    def shards_identity(self) -> str:
        """The identity of the shards the union reads from this folder (a brace pattern may select some)."""
        return shards_identity(self.manifest.shards)


def union_classes(class_lists: Sequence[Sequence[str]]) -> list[str]:
    """The classes of several folders united by name, in a stable order: the first folder's, then each new name
    in the order it first appears. An old class keeps its index when folders are added after it."""
    names: dict[str, None] = {}
    for classes in class_lists:
        names.update(dict.fromkeys(classes))
    return list(names)


def union(folders: Sequence[tuple[str, Manifest]], classes: Sequence[str] | None = None) -> Manifest:
    """One manifest over the shards of several folders ((location, manifest) pairs, in order), classes united by
    name (`union_classes`), or mapped into `classes` (a test split into its training classes; each of its class
    names must be among them: recog.config.check_against_data says so first). One folder whose classes are
    already those is returned as it is."""
    if len(folders) == 1 and (classes is None or list(classes) == folders[0][1].classes):
        return folders[0][1]
    seen: dict[tuple[str, str], str] = {}  # (folder identity, shard name): a copy, or a pattern, holds the same
    for location, manifest in folders:
        for shard in manifest.shards:
            if (key := (manifest.identity, shard.name)) in seen:
                raise ConfigError(f"{location} holds the shard {shard.name} of {seen[key]}, listed before it, so its "
                                  "samples would be read twice an epoch; list each folder (or shard) once.")
            seen[key] = location
    names = list(classes) if classes is not None else union_classes([m.classes for _, m in folders])
    label = {name: i for i, name in enumerate(names)}
    parts, shards, counts, first = [], [], [0] * len(names), 0
    for location, manifest in folders:
        labels = tuple(label[name] for name in manifest.classes)  # KeyError: a class `classes` lacks
        for own, count in enumerate(manifest.class_counts):
            counts[labels[own]] += count
        parts.append(Folder(manifest, first, labels, location))
        shards += manifest.shards
        first += len(manifest.shards)
    return Manifest(shards, names, counts, root=" + ".join(m.root for _, m in folders),
                    stats=merged_stats([m for _, m in folders]), folders=tuple(parts))


def merged_stats(manifests: Sequence[Manifest]) -> dict:
    """What the images of several folders are, from each folder's manifest stats (write.data_stats), weighted by
    their samples: colour if any folder is; the smallest and largest sizes, the folders' medians' weighted
    median; each channel's mean and std over all. Empty if a folder's manifest records none."""
    stats = [m.stats for m in manifests]
    if not all(stats):
        return {}
    weights = [m.num_samples for m in manifests]
    channels = max(s["channels"] for s in stats)

    def per_channel(s: dict, key: str) -> list[float]:
        return list(s[key]) * channels if len(s[key]) < channels else list(s[key][:channels])

    def spread(key: str) -> dict:
        medians = sorted((s[key]["median"], w) for s, w in zip(stats, weights))
        below = np.cumsum([w for _, w in medians])
        median = medians[int(np.searchsorted(below, below[-1] / 2))][0]  # the weighted median of the medians
        return {"min": min(s[key]["min"] for s in stats), "median": median, "max": max(s[key]["max"] for s in stats)}

    total = sum(weights)
    mean = [sum(w * per_channel(s, "mean")[c] for s, w in zip(stats, weights)) / total for c in range(channels)]
    square = [sum(w * (per_channel(s, "std")[c] ** 2 + per_channel(s, "mean")[c] ** 2) for s, w in zip(stats, weights))
              / total for c in range(channels)]
    std = [max(sq - m * m, 0.0) ** 0.5 for sq, m in zip(square, mean)]
    return {"channels": channels, "height": spread("height"), "width": spread("width"),
            "mean": [round(x, 4) for x in mean], "std": [round(x, 4) for x in std],
            "sampled": sum(s.get("sampled", 0) for s in stats)}


def locations_of(value: str | Path | Sequence[str | Path]) -> list[str]:
    """data.train / data.test as a list: one location (a folder, URL or brace pattern), or each of a list's."""
    return [str(value)] if isinstance(value, (str, Path)) else [str(location) for location in value]


def load_manifests(locations: str | Path | Sequence[str | Path], source: ShardSource | None = None) -> Manifest:
    """The manifest of one location (`load_manifest`), or of a list of them united (`union`); a list of one is
    that folder's own manifest."""
    if isinstance(locations, (str, Path)):
        return load_manifest(locations, source)
    locations = locations_of(locations)
    if not locations:
        raise ConfigError("an empty list of shard folders was given; give at least one folder.")
    return union([(location, load_manifest(location, source)) for location in locations])


def into_classes(manifest: Manifest, classes: Sequence[str]) -> Manifest:
    """`manifest`'s shards with their labels mapped into `classes` by name (a test split read against its
    training classes; each of its class names must be among them)."""
    return union([(f.location, f.manifest) for f in manifest.parts()], classes)


def missing_classes(classes: Sequence[str], known: Sequence[str]) -> list[str]:
    """The names in `classes` that `known` lacks, in order."""
    known = set(known)
    return [name for name in classes if name not in known]


def manifest_path(location: str | Path) -> str:
    """Accept a folder of shards (local or URL) or the manifest file itself."""
    location = str(location)
    return location if location.endswith(".json") else join(location, MANIFEST)


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """Write atomically: readers never see half a manifest."""
    return atomic_write(Path(folder) / MANIFEST, lambda f: f.write(json.dumps(manifest.to_json(), indent=1).encode()))


def load_manifest(location: str | Path, source: ShardSource | None = None, *, check_files: bool = True) -> Manifest:
    """Read and check the manifest of a folder of shards; every problem is one ConfigError sentence.

    `location` is a local folder, an http(s) URL of one, a manifest.json, or a
    brace pattern of shard names (`/data/train-{000000..000009}.tar`), which
    selects those shards from the manifest in their folder.
    """
    source = source or ShardSource()
    location = str(location)
    if "{" in location:
        return _select_shards(location, source, check_files)
    path = manifest_path(location)
    source.check(path)
    try:
        raw = json.loads(source.read_bytes(path))
    except FileNotFoundError:
        raise ConfigError(
            f"no shard manifest at {path}; write shards with `python -m recog.data write ...` or fix the data path."
        ) from None
    except ValueError as e:  # not JSON (or not text)
        raise ConfigError(f"{path} is not valid JSON ({e}); write the shards again, or restore the manifest "
                          "from a copy.") from None
    if isinstance(raw, dict) and raw.get("format") == EMBEDDINGS_FORMAT:
        raise ConfigError(f"{location} is a folder of embeddings (python -m recog.embed writes those), not of "
                          "shards; give the folder of shards the images were written to (python -m recog.data "
                          "write ...).")
    try:
        shards = [ShardInfo(**s) for s in raw["shards"]]
        root = path.rsplit("/", 1)[0] if is_remote(path) else str(Path(path).parent)
        manifest = Manifest(shards, list(raw["classes"]), list(raw["class_counts"]), root=root,
                            index=raw.get("index", ""), stats=dict(raw.get("stats") or {}))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"shard manifest {path} is not valid ({e!r}); write the shards again.") from None
    for name in [s.name for s in shards] + [manifest.index] * bool(manifest.index):
        plain_name(name, path, "write the shards again with python -m recog.data write.")  # never out of the folder
    if not shards or manifest.num_samples == 0:
        raise ConfigError(f"shard manifest {path} lists no samples; write the shards again from a non-empty source.")
    if check_files:
        _check_files(manifest, f"listed in {path}")
    return manifest


def _check_files(manifest: Manifest, where: str) -> None:
    if is_remote(manifest.root):
        return
    missing = [s.name for s in manifest.shards if not (Path(manifest.root) / s.name).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} shard(s) {where} are missing (first: {Path(manifest.root) / missing[0]}); "
                          "copy them there or write the shards again.")


def _select_shards(pattern: str, source: ShardSource, check_files: bool) -> Manifest:
    names = list(braceexpand(pattern))
    folders = {name.rsplit("/", 1)[0] for name in names}
    if len(folders) != 1:
        raise ConfigError(f"shard pattern {pattern} spans several folders; give one folder's shards per pattern.")
    full = load_manifest(folders.pop(), source, check_files=False)
    by_name = {s.name: s for s in full.shards}
    wanted = [name.rsplit("/", 1)[-1] for name in names]
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise ConfigError(f"shard {unknown[0]} (from {pattern}) is not in the manifest of {full.root}; "
                          "check the pattern against `python -m recog.data info`.")
    manifest = Manifest([by_name[n] for n in wanted], full.classes, full.class_counts, root=full.root,
                        index=full.index, stats=full.stats, folder_identity=full.identity)
    if check_files:
        _check_files(manifest, f"selected by {pattern}")
    return manifest
