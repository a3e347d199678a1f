"""The manifest: what a folder of shards holds, written last so its presence means 'complete'."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

    @property
    def identity(self) -> str:
        """The identity of the folder these shards belong to (shards_identity of all of its shards)."""
        return self.folder_identity or shards_identity(self.shards)

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
        return join(self.root, self.shards[shard].name)

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
