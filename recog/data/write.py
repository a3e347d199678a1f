"""Write WebDataset tar shards (`<key>.png|jpg` + `<key>.cls`) and their manifest.

Sources: a folder of class sub-folders of images, a list file (`path<TAB>label`
per line), or MNIST-format idx files. Each source is a list of `Record`s that
read their bytes lazily, so writing streams through data sets larger than
memory; shards can be written by several processes at once.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import shutil
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from recog.data.idx import read_idx
from recog.data.manifest import INDEX, MANIFEST, Manifest, ShardInfo, write_manifest
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
    size: int = 0  # bytes, known or estimated before reading: for shards of a target size in MB


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
                records.append(Record(label, ext, path.read_bytes, path.stat().st_size))
    if not records:
        raise ConfigError(f"no .jpg/.jpeg/.png/.webp images under {root}; check the folder.")
    return records, classes


def list_records(list_file: str | Path) -> tuple[list[Record], list[str]]:
    """`path<TAB>label` per line; relative paths are relative to the list's folder.

    Labels are class names, or class indices when every label is a whole number.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise ConfigError(f"list file {list_file} does not exist; give a file of `path<TAB>label` lines.")
    rows = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2:
            raise ConfigError(f"{list_file}:{number} is not `path<TAB>label`; separate the two with one tab.")
        path = (list_file.parent / parts[0]).resolve()
        ext = IMAGE_EXTS.get(path.suffix.lower())
        if ext is None or not path.is_file():
            raise ConfigError(f"{list_file}:{number}: {path} is not a .jpg/.jpeg/.png/.webp file; fix the line.")
        rows.append((path, ext, parts[1].strip()))
    if not rows:
        raise ConfigError(f"list file {list_file} lists no images; add `path<TAB>label` lines.")
    labels = [label for _, _, label in rows]
    if all(label.isdigit() for label in labels):
        classes = [str(i) for i in range(max(map(int, labels)) + 1)]
        index = {c: i for i, c in enumerate(classes)}
    else:
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
    records = [Record(index[label], ext, path.read_bytes, path.stat().st_size) for path, ext, label in rows]
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

    size = int(pixels[0].size)
    return [Record(int(targets[i]), "png", encoder(i), size) for i in range(len(targets))], classes


def prepare_output(out_dir: str | Path, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"output folder {out_dir} is not empty; choose another folder or pass --overwrite.")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def plan_shards(records: Sequence[Record], order: Sequence[int], shard_samples: int,
                shard_mb: float | None = None) -> list[list[int]]:
    """Cut `order` into shards of at most `shard_samples` samples and (if given) about `shard_mb` MB."""
    limit = shard_mb * 1e6 if shard_mb else float("inf")
    shards, current, size = [], [], 0
    for i in order:
        if current and (len(current) >= shard_samples or size + records[i].size > limit):
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += records[i].size + 1024  # tar headers: 512 bytes per member, two members per sample
    if current:
        shards.append(current)
    return shards


def reencode(data: bytes, fmt: str, quality: int) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("L" if image.mode in ("L", "I;16", "1") else "RGB")
        out = io.BytesIO()
        image.save(out, format="JPEG" if fmt == "jpg" else fmt.upper(), quality=quality)
        return out.getvalue()


_RECORDS: Sequence[Record] = ()  # the records a forked writer process reads (closures do not pickle)


def _write_shard(job: tuple[Path, str, list[int], str | None, int]) -> tuple[ShardInfo, list[int], list[tuple]]:
    """Write one shard; return its ShardInfo, its labels, and (offset, size) of each image inside the tar."""
    out_dir, name, indices, fmt, quality = job
    tmp = out_dir / f".{name}.tmp"
    labels = []
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as tar:  # fixed mtime: same input, same bytes
        for i in indices:
            rec = _RECORDS[i]
            data, ext = rec.read(), rec.ext
            if fmt and ext != fmt:
                data, ext = reencode(data, fmt, quality), fmt
            tar.write({"__key__": f"{i:09d}", ext: data, "cls": str(rec.label).encode()})
            labels.append(rec.label)
    with tarfile.open(tmp, "r:") as written:  # where each image's bytes landed: the random-access index
        places = [(m.offset_data, m.size) for m in written if not m.name.endswith(".cls")]
    os.replace(tmp, out_dir / name)
    return ShardInfo(name, len(indices), (out_dir / name).stat().st_size, sha256_of(out_dir / name)), labels, places


def write_index(out_dir: Path, shards: list[ShardInfo], labels: list[list[int]], places: list[list[tuple]]) -> str:
    """index.npz: for every sample, its shard, the offset and size of its image in the tar, and its label."""
    counts = [len(x) for x in labels]
    np.savez(out_dir / INDEX,
             shard=np.repeat(np.arange(len(shards), dtype=np.int32), counts),
             offset=np.array([o for p in places for o, _ in p], dtype=np.int64),
             size=np.array([n for p in places for _, n in p], dtype=np.int64),
             label=np.array([x for per_shard in labels for x in per_shard], dtype=np.int64),
             shard_names=np.array([s.name for s in shards]))
    return INDEX


def write_shards(
    records: Sequence[Record],
    classes: Sequence[str],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    shard_samples: int = 5000,
    shard_mb: float | None = None,
    shuffle: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    workers: int = 1,
    reencode_to: str | None = None,
    quality: int = 90,
    progress: bool = True,
) -> Manifest:
    """Write `records` into tar shards, then the manifest (last, so its presence means 'complete').

    shard_samples / shard_mb: a shard ends at whichever limit comes first.
    workers: processes writing shards at once. reencode_to: 'jpg' or 'png'
    re-encodes images in another format; None passes the bytes through.
    """
    global _RECORDS
    if shard_samples < 1 or (shard_mb is not None and shard_mb <= 0):
        raise ConfigError(f"shard size must be positive (shard_samples={shard_samples}, shard_mb={shard_mb}).")
    if reencode_to not in (None, "jpg", "png", "webp"):
        raise ConfigError(f"cannot re-encode to '{reencode_to}'; use jpg, png or webp.")
    if not records:
        raise ConfigError("no samples to write; check the source.")
    out_dir = prepare_output(out_dir, overwrite)
    order = list(range(len(records)))
    if shuffle:  # so a shard holds a mix of classes even when the source is sorted by class
        random.Random(seed).shuffle(order)
    jobs = [(out_dir, f"{prefix}-{n:06d}.tar", chunk, reencode_to, quality)
            for n, chunk in enumerate(plan_shards(records, order, shard_samples, shard_mb))]

    _RECORDS = records
    counts = [0] * len(classes)
    shards: list[ShardInfo] = []
    all_labels: list[list[int]] = []
    all_places: list[list[tuple]] = []
    bar = tqdm(total=len(order), desc=f"writing {out_dir}", unit="img", disable=not progress)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for info, labels, places in (pool.imap(_write_shard, jobs) if pool else map(_write_shard, jobs)):
            shards.append(info)
            all_labels.append(labels)
            all_places.append(places)
            for label in labels:
                counts[label] += 1
            bar.update(len(labels))
    finally:
        if pool:
            pool.terminate()
        _RECORDS = ()
        bar.close()
    index = write_index(out_dir, shards, all_labels, all_places)
    manifest = Manifest(shards, list(classes), counts, root=str(out_dir), index=index)
    write_manifest(manifest, out_dir)
    return manifest


def is_written(out_dir: str | Path) -> bool:
    return (Path(out_dir) / MANIFEST).is_file()
