"""Write WebDataset tar shards (`<key>.png|jpg` + `<key>.cls`) and their manifest.

Sources: a folder of class sub-folders of images, or MNIST-format idx files.
Each source is a list of `Record`s that read their bytes lazily, so writing
streams through data sets larger than memory.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from recog.data.idx import read_idx
from recog.data.manifest import MANIFEST, Manifest, ShardInfo, write_manifest
from recog.data.source import sha256_of
from recog.errors import ConfigError

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


@dataclass(frozen=True)
class Record:
    label: int
    ext: str  # "png", "jpg" or "webp": the image bytes are stored under this extension
    read: Callable[[], bytes]


def folder_records(root: str | Path) -> tuple[list[Record], list[str]]:
    """One class per sub-folder (sorted by name), images passed through unchanged."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist; give a folder with one sub-folder per class.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"image folder {root} has no class sub-folders; put each class's images in root/<class>/.")
    records = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            ext = IMAGE_EXTS.get(path.suffix.lower())
            if ext and path.is_file():
                records.append(Record(label, ext, path.read_bytes))
    if not records:
        raise ConfigError(f"no .jpg/.jpeg/.png/.webp images under {root}; check the folder.")
    return records, classes


def idx_records(images: str | Path, labels: str | Path, class_names: Sequence[str] | None = None):
    """Records from an idx image file (N, H, W) and its idx label file (N,), encoded as PNG."""
    from PIL import Image

    pixels, targets = read_idx(images), read_idx(labels)
    if pixels.ndim != 3 or targets.ndim != 1 or len(pixels) != len(targets):
        raise ConfigError(
            f"{images} and {labels} do not match: images {pixels.shape}, labels {targets.shape}; "
            "give an (N, H, W) image file and its (N,) label file."
        )
    num_classes = int(targets.max()) + 1
    classes = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if len(classes) < num_classes:
        raise ConfigError(f"{len(classes)} class names given but labels go up to {num_classes - 1}; name every class.")

    def encoder(i: int) -> Callable[[], bytes]:
        def encode() -> bytes:
            buf = io.BytesIO()
            Image.fromarray(pixels[i]).save(buf, format="PNG")
            return buf.getvalue()

        return encode

    return [Record(int(targets[i]), "png", encoder(i)) for i in range(len(targets))], classes


def prepare_output(out_dir: str | Path, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"output folder {out_dir} is not empty; choose another folder or pass --overwrite.")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_shards(
    records: Sequence[Record],
    classes: Sequence[str],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    shard_samples: int = 5000,
    shuffle: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write `records` into tar shards of `shard_samples` each, then the manifest (last)."""
    if shard_samples < 1:
        raise ConfigError(f"shard_samples must be at least 1, got {shard_samples}.")
    if not records:
        raise ConfigError("no samples to write; check the source.")
    out_dir = prepare_output(out_dir, overwrite)
    order = list(range(len(records)))
    if shuffle:  # so a shard holds a mix of classes even when the source is sorted by class
        random.Random(seed).shuffle(order)

    counts = [0] * len(classes)
    shards: list[ShardInfo] = []
    bar = tqdm(total=len(order), desc=f"writing {out_dir}", unit="img", disable=not progress)
    for start in range(0, len(order), shard_samples):
        name = f"{prefix}-{len(shards):06d}.tar"
        tmp = out_dir / f".{name}.tmp"
        chunk = order[start : start + shard_samples]
        with wds.TarWriter(str(tmp), encoder=False) as tar:
            for i in chunk:
                rec = records[i]
                tar.write({"__key__": f"{i:09d}", rec.ext: rec.read(), "cls": str(rec.label).encode()})
                counts[rec.label] += 1
                bar.update()
        os.replace(tmp, out_dir / name)
        shards.append(ShardInfo(name, len(chunk), (out_dir / name).stat().st_size, sha256_of(out_dir / name)))
    bar.close()
    manifest = Manifest(shards, list(classes), counts, root=str(out_dir))
    write_manifest(manifest, out_dir)
    return manifest


def is_written(out_dir: str | Path) -> bool:
    return (Path(out_dir) / MANIFEST).is_file()
