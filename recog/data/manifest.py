"""The manifest: what a folder of shards holds, written last so its presence means 'complete'."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recog.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = "recog-shards/1"


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
    class_counts: list[int]
    root: str = field(default="", compare=False)  # the folder the shard names are relative to

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
        return os.path.join(self.root, self.shards[shard].name)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "num_samples": self.num_samples,
            "classes": self.classes,
            "class_counts": self.class_counts,
            "shards": [asdict(s) for s in self.shards],
        }


def manifest_path(location: str | Path) -> Path:
    """Accept a folder of shards or the manifest file itself."""
    location = Path(location)
    return location if location.suffix == ".json" else location / MANIFEST


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """Write atomically: readers never see half a manifest."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1))
    os.replace(tmp, path)
    return path


def load_manifest(location: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and check a manifest; every problem is one ConfigError sentence."""
    path = manifest_path(location)
    if not path.is_file():
        raise ConfigError(
            f"no shard manifest at {path}; write shards with `python -m recog.data write ...` or fix the data path."
        )
    try:
        raw = json.loads(path.read_text())
        shards = [ShardInfo(**s) for s in raw["shards"]]
        manifest = Manifest(shards, list(raw["classes"]), list(raw["class_counts"]), root=str(path.parent))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"shard manifest {path} is not valid ({e!r}); write the shards again.") from None
    if not shards or manifest.num_samples == 0:
        raise ConfigError(f"shard manifest {path} lists no samples; write the shards again from a non-empty source.")
    if check_files:
        missing = [s.name for s in shards if not (path.parent / s.name).is_file()]
        if missing:
            raise ConfigError(
                f"{len(missing)} shard(s) listed in {path} are missing (first: {path.parent / missing[0]}); "
                "copy them there or write the shards again."
            )
    return manifest
