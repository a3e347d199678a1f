"""Write a data set's shards on first use (e.g. the bundled Fashion-MNIST subset)."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from recog.data.idx import find_idx_pair
from recog.data.manifest import MANIFEST, Manifest, locations_of, manifest_path
from recog.data.source import is_remote
from recog.data.write import FASHION_MNIST_CLASSES, idx_records, write_shards
from recog.errors import ConfigError

CLASS_NAME_PRESETS = {"fashion_mnist": FASHION_MNIST_CLASSES}


def parse_class_names(spec: str | Sequence[str] | None) -> list[str] | None:
    """The class names a `--class-names` or `data.prepare.class_names` gives: a preset name ('fashion_mnist'), a
    comma-separated string, a list (a config's list too), or None (the labels' numbers: '0', '1', ...)."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return list(spec)
    if spec in CLASS_NAME_PRESETS:
        return CLASS_NAME_PRESETS[spec]
    return [name.strip() for name in spec.split(",")]


def write_idx_split(src_dir: str | Path, split: str, out_dir: str | Path, names: str | Sequence[str] | None = None,
                    shard_samples: int = 5000, progress: bool = True) -> Manifest:
    """Write the idx files of `split` ('train' or 'test') in an MNIST-style folder as shards named after the
    split; `names`: the classes' names as parse_class_names takes them."""
    images, labels = find_idx_pair(src_dir, split)
    records, classes = idx_records(images, labels, parse_class_names(names))
    return write_shards(records, classes, out_dir, prefix=split, shard_samples=shard_samples, progress=progress)


def missing_splits(data_cfg) -> list[str]:
    """The splits ('train', 'test') that `prepare` is to write: those whose folder is its own (`prepare.out`/split)
    and holds no manifest yet. A path the user gave is never filled with the bundled data: a mistyped path
    must be an error, not a copy of Fashion-MNIST."""
    prepare = data_cfg.get("prepare")
    if not prepare or not prepare.get("out"):
        return []
    own = Path(prepare.out).resolve()
    return [split for split in ("train", "test") if is_own(locations_of(data_cfg[split]), own / split)]


def is_own(locations: list[str], folder: Path) -> bool:
    """Whether data.train/test (`locations`) is `prepare`'s own `folder` alone, with no manifest in it yet."""
    return (len(locations) == 1 and not is_remote(locations[0]) and Path(locations[0]).resolve() == folder
            and not (folder / MANIFEST).is_file())


def check_can_prepare(data_cfg) -> None:
    """Raise one sentence if a local folder of shards is missing and is not `prepare`'s to write. Touches no
    collective."""
    to_write = missing_splits(data_cfg)
    for split in ("train", "test"):
        for location in locations_of(data_cfg[split]):  # data.train/test: a folder, or a list of them
            if split in to_write or is_remote(location) or "{" in location:
                continue
            if not Path(manifest_path(location)).is_file():
                raise ConfigError(f"no shards at {location} (no manifest.json there); write them with "
                                  f"`python -m recog.data write ...` or fix data.{split}.")
    for split in to_write:
        find_idx_pair(data_cfg.prepare.idx_dir, split)  # raises a ConfigError naming the missing file


def prepare_shards(data_cfg, progress: bool = True) -> None:
    """Write each missing split into a private folder, then rename it into place.

    Safe when several nodes share the folder: the first rename wins and the
    others throw their copy away.
    """
    prepare = data_cfg.prepare
    for split in missing_splits(data_cfg):
        final = Path(data_cfg[split])
        tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_idx_split(prepare.idx_dir, split, tmp, prepare.get("class_names"),
                        prepare.get("shard_samples", 5000), progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not Path(manifest_path(final)).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
