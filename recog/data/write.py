"""Write WebDataset tar shards (`<key>.png|jpg` + `<key>.cls`) and their manifest.

Sources: a folder of class sub-folders of images, a list file (`path<TAB>label`
per line), or MNIST-format idx files. Each source is a list of `Record`s that
read their bytes lazily, so writing streams through data sets larger than
memory; shards can be written by several processes at once.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import random
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import UnidentifiedImageError
from tqdm import tqdm

from recog.data.idx import read_idx
from recog.data.manifest import INDEX, MANIFEST, Manifest, ShardInfo, write_manifest
from recog.data.source import sha256_of
from recog.errors import ConfigError

log = logging.getLogger(__name__)

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
    path: str = ""  # the source file, resolved: names it in messages, keeps the output folder away from it
    check: bool = True  # decode while writing; False for images recog encoded itself


def folder_records(root: str | Path) -> tuple[list[Record], list[str]]:
    """One class per sub-folder (sorted by name), images passed through unchanged."""
    root = Path(root).resolve()
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
                records.append(Record(label, ext, path.read_bytes, path.stat().st_size, str(path)))
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
    records = [Record(index[label], ext, path.read_bytes, path.stat().st_size, str(path)) for path, ext, label in rows]
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
    return [Record(int(targets[i]), "png", encoder(i), size, check=False) for i in range(len(targets))], classes


def prepare_output(out_dir: Path, overwrite: bool, shard_names: Sequence[str], sources: Sequence[Path]) -> None:
    """Refuse, before touching anything, an output folder that is, holds or lies inside a source, or whose
    files recog did not write would be replaced. With `overwrite`, remove only an earlier write's files."""
    for src in sources:
        if src == out_dir or out_dir in src.parents or src in out_dir.parents:
            raise ConfigError(f"output folder {out_dir} is, holds or lies inside the source {src}; "
                              "choose an output folder outside the source.")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        out_dir.mkdir(parents=True, exist_ok=True)
        return
    if not overwrite:
        raise ConfigError(f"output folder {out_dir} is not empty; choose another folder or pass --overwrite.")
    ours = {MANIFEST, INDEX}
    try:
        ours |= {s["name"] for s in json.loads((out_dir / MANIFEST).read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no readable manifest: no earlier shard is known to be ours
    ours = {name for name in ours if name == Path(name).name}  # never follow a manifest out of the folder
    for name in shard_names:
        if name not in ours and (out_dir / name).exists():
            raise ConfigError(f"{out_dir / name} is not listed in a manifest there, so it is not recog's to replace; "
                              "move it away or choose another output folder.")
    leftovers = [p.name for p in out_dir.glob(".*.tar.tmp")] + [p.name for p in out_dir.glob(f".{MANIFEST}.tmp-*")]
    for name in ours | set(leftovers):
        if (out_dir / name).is_file():
            (out_dir / name).unlink()


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


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
STATS_SAMPLE = 5000  # images measured for the manifest's statistics: mean/std settle well before this


def check_image(data: bytes, measure: bool = False) -> tuple | None:
    """Raise if the bytes do not decode to a whole image: training would only skip it later.

    With `measure`: (grey?, height, width, per-channel sum, per-channel sum of squares, pixels), on [0, 1]
    RGB values (a grey image counts the same in each channel), for the manifest's statistics.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if not measure:
            return None
        grey = image.mode in GREY_MODES
        pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float64).reshape(-1, 1 if grey else 3)
    pixels = np.broadcast_to(pixels / 255.0, (len(pixels), 3))
    return grey, image.height, image.width, pixels.sum(0), (pixels ** 2).sum(0), len(pixels)


def measure_quietly(data: bytes) -> tuple | None:
    """check_image's measurements, or None for an image that does not decode (one that was not to be checked:
    training skips and counts it)."""
    try:
        return check_image(data, measure=True)
    except Exception:  # noqa: BLE001 - any decoding failure
        return None


def data_stats(measured: list[tuple]) -> dict:
    """What the images are, from a sample: channels (1 if every image is grey), the distribution of their
    height and width, and per-channel mean and std. Recorded in the manifest; `data=images` uses them."""
    grey = all(m[0] for m in measured)
    sums, squares = sum(m[3] for m in measured), sum(m[4] for m in measured)
    pixels = sum(m[5] for m in measured)
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean ** 2, 0.0))
    channels = 1 if grey else 3

    def spread(values):
        return {"min": int(min(values)), "median": int(np.median(values)), "max": int(max(values))}

    return {"channels": channels, "height": spread([m[1] for m in measured]), "width": spread([m[2] for m in measured]),
            "mean": [round(float(x), 4) for x in mean[:channels]], "std": [round(float(x), 4) for x in std[:channels]],
            "sampled": len(measured)}


def _write_shard(job: tuple[Path, str, list[int], str | None, int, bool, frozenset]):
    """Write one shard; return its ShardInfo (None if no image was readable), its labels,
    (key, offset, size) of each image inside the tar, (file, reason) of each image skipped, and the
    measurements of the images in `sample` (see check_image)."""
    out_dir, name, indices, fmt, quality, strict, sample = job
    tmp = out_dir / f".{name}.tmp"
    labels, skipped, measured = [], [], []
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as tar:  # fixed mtime: same input, same bytes
        for i in indices:
            rec = _RECORDS[i]
            data, ext = rec.read(), rec.ext
            try:
                found = None
                reencoded = bool(fmt) and ext != fmt
                if reencoded:  # decodes the image: a check in itself
                    data, ext = reencode(data, fmt, quality), fmt
                elif rec.check:
                    found = check_image(data, measure=i in sample)
            except Exception as e:  # whatever the training-side decode would skip (PIL raises many kinds)
                why = "not an image" if isinstance(e, UnidentifiedImageError) else str(e)
                if strict:
                    raise ConfigError(f"image {rec.path or f'#{i}'} cannot be decoded ({why}); "
                                      "fix or remove it, or leave out --strict to skip unreadable images.") from None
                skipped.append((rec.path or f"#{i}", why))
                continue
            tar.write({"__key__": f"{i:09d}", ext: data, "cls": str(rec.label).encode()})
            labels.append(rec.label)
            if i in sample and found is None:  # re-encoded or unchecked: measured as written, if it decodes
                found = measure_quietly(data)
            if found is not None:
                measured.append(found)
    if not labels:  # a shard of unreadable images only: leave it out
        tmp.unlink()
        return None, labels, [], skipped, measured
    with tarfile.open(tmp, "r:") as written:  # where each image's bytes landed: the random-access index
        places = [(m.name.split(".", 1)[0], m.offset_data, m.size) for m in written if not m.name.endswith(".cls")]
    os.replace(tmp, out_dir / name)
    info = ShardInfo(name, len(labels), (out_dir / name).stat().st_size, sha256_of(out_dir / name))
    return info, labels, places, skipped, measured


def write_index(out_dir: Path, shards: list[ShardInfo], labels: list[list[int]], places: list[list[tuple]]) -> str:
    """index.npz: for every sample, its shard, the offset and size of its image in the tar, its label and key."""
    counts = [len(x) for x in labels]
    np.savez(out_dir / INDEX,
             shard=np.repeat(np.arange(len(shards), dtype=np.int32), counts),
             offset=np.array([o for p in places for _, o, _ in p], dtype=np.int64),
             size=np.array([n for p in places for _, _, n in p], dtype=np.int64),
             key=np.array([k for p in places for k, _, _ in p], dtype=str),
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
    sources: Sequence[str | Path] = (),
    strict: bool = False,
    workers: int = 1,
    reencode_to: str | None = None,
    quality: int = 90,
    progress: bool = True,
) -> Manifest:
    """Write `records` into tar shards, then the manifest (last, so its presence means 'complete').

    shard_samples / shard_mb: a shard ends at whichever limit comes first.
    overwrite: replace an earlier write's files in `out_dir`; no other file is ever removed or replaced.
    sources: the folder, list file or idx files read, which `out_dir` must stay apart from.
    strict: stop at the first image that does not decode, instead of skipping it with a warning.
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
    out_dir = Path(out_dir).resolve()
    order = list(range(len(records)))
    if shuffle:  # so a shard holds a mix of classes even when the source is sorted by class
        random.Random(seed).shuffle(order)
    sample = set(order[::max(1, len(order) // STATS_SAMPLE)])  # spread over the data, the same for any workers
    jobs = [(out_dir, f"{prefix}-{n:06d}.tar", chunk, reencode_to, quality, strict,
             frozenset(sample.intersection(chunk)))
            for n, chunk in enumerate(plan_shards(records, order, shard_samples, shard_mb))]
    inside = str(out_dir) + os.sep  # records' paths are resolved: a prefix test is exact, and fast for millions
    held = [Path(r.path) for r in records if r.path.startswith(inside)][:1]
    prepare_output(out_dir, overwrite, [job[1] for job in jobs], [Path(s).resolve() for s in sources] + held)

    _RECORDS = records
    counts = [0] * len(classes)
    shards: list[ShardInfo] = []
    all_labels: list[list[int]] = []
    all_places: list[list[tuple]] = []
    skipped: list[tuple[str, str]] = []
    measured: list[tuple] = []
    bar = tqdm(total=len(order), desc=f"writing {out_dir}", unit="img", disable=not progress)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for info, labels, places, bad, seen in (pool.imap(_write_shard, jobs) if pool else map(_write_shard, jobs)):
            measured += seen
            for path, reason in bad:
                log.warning("skipped unreadable image %s (%s)", path, reason)
            skipped += bad
            bar.update(len(labels) + len(bad))
            if info is None:
                continue
            shards.append(info)
            all_labels.append(labels)
            all_places.append(places)
            for label in labels:
                counts[label] += 1
        if not shards:
            raise ConfigError(f"none of the {len(records)} images could be decoded (first: {skipped[0][0]}); "
                              "check the source.")
        index = write_index(out_dir, shards, all_labels, all_places)
        manifest = Manifest(shards, list(classes), counts, root=str(out_dir), index=index,
                            stats=data_stats(measured) if measured else {})
        write_manifest(manifest, out_dir)
    except BaseException:  # a bad image under strict, an error, Ctrl-C: leave nothing of this write behind
        if pool:
            pool.terminate()  # first, so that no worker still writes what is removed here
        names = [job[1] for job in jobs]
        for name in names + [f".{name}.tmp" for name in names] + [INDEX, f".{MANIFEST}.tmp-{os.getpid()}"]:
            (out_dir / name).unlink(missing_ok=True)
        raise
    finally:
        if pool:
            pool.terminate()
        _RECORDS = ()
        bar.close()
    if skipped:
        log.warning("skipped %d unreadable images (first: %s)", len(skipped), skipped[0][0])
    return manifest


def measure_shards(manifest: Manifest, source=None, images: int = 1000, shards: int = 10) -> dict:
    """`data_stats` of shards whose manifest lacks them (written by another tool or an older recog): the
    first images of up to `shards` shards spread over the set. Unreadable samples are left out."""
    from recog.data.decode import IMAGE_KEYS
    from recog.data.plan import Piece
    from recog.data.stream import read_pieces

    chosen = list(range(len(manifest.shards)))[::max(1, len(manifest.shards) // shards)][:shards]
    per_shard = -(-images // len(chosen))
    pieces = [Piece(i, 0, min(per_shard, manifest.shards[i].samples)) for i in chosen]
    measured = []
    for sample in read_pieces(manifest, pieces, strict=False, source=source):
        key = next((k for k in IMAGE_KEYS if sample and k in sample), None)
        try:
            measured.append(check_image(sample[key], measure=True))
        except Exception:  # noqa: BLE001 - skipped here, and counted when training reads it
            continue
    if not measured:
        raise ConfigError(f"no readable image in the first samples of {manifest.root}; check the shards.")
    return data_stats(measured)
