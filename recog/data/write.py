"""Write WebDataset tar shards (`<key>.png|jpg|webp` + `<key>.cls`) and their manifest.

Sources: a folder of class sub-folders of images, a list file (`path<TAB>label`
per line), or MNIST-format idx files. Each source is a list of `Record`s that
read their bytes lazily, so writing a folder or a list streams through data sets
larger than memory (an idx file is read whole); shards can be written by several
processes at once.

An output folder has one writer at a time (`exclusive`), and the writer replaces only what recog's shard writer
wrote: a manifest of format `recog-shards/1` and the files it names, or the files a writer that was killed named in
its marker (`.recog-shard-write.json`, written before anything else and removed once the manifest is written).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import random
import socket
import tarfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError
from tqdm import tqdm

from recog.data.idx import read_idx
from recog.data.manifest import FORMAT, INDEX, MANIFEST, Manifest, ShardInfo, write_manifest
from recog.errors import ConfigError
from recog.files import LOCK_FILE, atomic_write, disk_error, exclusive, is_plain_name, sha256_of

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
MARKER = ".recog-shard-write.json"  # while a write runs: the files it may create (see finish_dead_write)
MARKER_FORMAT = "recog-shard-write/1"
MAX_CLASSES = 1_000_000  # numbered labels (a list file's, an idx file's) reach at most this, or the number of images

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


def file_record(label: int, path: Path, ext: str) -> Record:
    """An image file, read when its shard is written."""
    return Record(label, ext, path.read_bytes, path.stat().st_size, str(path))


def class_limit(images: int) -> int:
    """How many classes numbered labels may name: each index up to the largest is a class, and 1e11 of them would
    fill the memory; MAX_CLASSES, or one per image where there are more images."""
    return max(MAX_CLASSES, images)


def numbered_classes(count: int) -> list[str]:
    """The names of classes known by their numbers only: '0', '1', ..."""
    return [str(i) for i in range(count)]


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
                records.append(file_record(label, path, ext))
    if not records:
        raise ConfigError(f"no .jpg/.jpeg/.png/.webp images under {root}; check the folder.")
    return records, classes


def list_records(list_file: str | Path) -> tuple[list[Record], list[str]]:
    """`path<TAB>label` per line; relative paths are relative to the list's folder.

    Labels are class names, or class indices (0, 1, ...) when every label is a whole number in ASCII digits
    (`²` is a name). An index may not exceed class_limit(images listed).
    """
    list_file = Path(list_file)
    rows = list_rows(list_file)
    classes = list_classes(list_file, rows)
    index = {c: i for i, c in enumerate(classes)}
    return [file_record(index[label], path, ext) for path, ext, label, _ in rows], classes


def list_rows(list_file: Path) -> list[tuple[Path, str, str, int]]:
    """(image path, its extension's kind, label, line number) of each line of a list file that names an image."""
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
        rows.append((path, ext, parts[1].strip(), number))
    if not rows:
        raise ConfigError(f"list file {list_file} lists no images; add `path<TAB>label` lines.")
    return rows


def list_classes(list_file: Path, rows: list[tuple[Path, str, str, int]]) -> list[str]:
    """The classes of a list file's labels: numbered ('0', '1', ... up to the largest index) when every label is
    a whole number, else the names sorted."""
    labels = [label for _, _, label, _ in rows]
    if not all(label.isascii() and label.isdigit() for label in labels):
        return sorted(set(labels))
    limit = class_limit(len(rows))
    for _, _, label, number in rows:
        digits = label.lstrip("0")
        if len(digits) > len(str(limit)) or int(digits or 0) >= limit:  # int() of 5,000 digits would raise
            raise ConfigError(f"{list_file}:{number}: class index {label[:24]} is far above the {len(rows)} "
                              f"images listed (indices name the classes 0, 1, ..., at most {limit:,} of them); "
                              "number the classes from 0, or give class names.")
    return numbered_classes(max(map(int, labels)) + 1)


def idx_records(images: str | Path, labels: str | Path, names: Sequence[str] | None = None):
    """Records from an idx image file (N, H, W) and its idx label file (N,), encoded as PNG; `names`: the classes'
    names in label order (default '0', '1', ...)."""
    from PIL import Image

    pixels, targets = read_idx(images), read_idx(labels)
    if pixels.ndim != 3 or targets.ndim != 1 or len(pixels) != len(targets):
        raise ConfigError(
            f"{images} and {labels} do not match: images {pixels.shape}, labels {targets.shape}; "
            "give an (N, H, W) image file and its (N,) label file."
        )
    limit = class_limit(len(targets))
    if targets.dtype.kind not in "iu" or targets.min() < 0 or targets.max() >= limit:
        raise ConfigError(f"{labels} holds labels from {targets.min()} to {targets.max()} ({targets.dtype}); "
                          f"give class indices 0, 1, ... (whole numbers, at most {limit:,} classes).")
    num_classes = int(targets.max()) + 1
    classes = list(names) if names else numbered_classes(num_classes)
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


def check_apart(out_dir: Path, sources: Sequence[Path]) -> None:
    """Refuse, before touching anything, an output folder that is, holds or lies inside a source."""
    for src in sources:
        if src == out_dir or out_dir in src.parents or src in out_dir.parents:
            raise ConfigError(f"output folder {out_dir} is, holds or lies inside the source {src}; "
                              "choose an output folder outside the source.")


@contextmanager
def writing_to(out_dir: Path):
    """An OSError met writing into `out_dir` (a full disk, a read-only folder) as one sentence; one about another
    file (a source image that cannot be read) keeps its traceback."""
    try:
        yield
    except OSError as e:
        if e.filename is not None and out_dir not in (Path(e.filename), Path(e.filename).parent):
            raise
        raise disk_error(e, out_dir) from None


def earlier_write(out_dir: Path) -> set[str]:
    """The files of an earlier write in `out_dir`: its manifest (format recog-shards/1), the shards it names and
    its index. A manifest of any other kind (another tool's, recog's embeddings) is refused: not recog's to
    replace."""
    path = out_dir / MANIFEST
    if not path.exists() and not path.is_symlink():
        return set()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        raw = None
    found = raw.get("format") if isinstance(raw, dict) else None
    if found != FORMAT or not isinstance(raw.get("shards"), list):
        kind = f"format {found!r}" if isinstance(found, str) else "no format recog knows"
        raise ConfigError(f"{path} is not a manifest of recog's shard writer ({kind}), so it is not recog's to "
                          "replace; move it away or choose another output folder.")
    names = {MANIFEST} | {s.get("name") for s in raw["shards"] if isinstance(s, dict)}
    if raw.get("index") == INDEX:
        names.add(INDEX)
    return {name for name in names if is_plain_name(name)}  # never follow a manifest out of the folder


def finish_dead_write(out_dir: Path) -> None:
    """Remove what a shard writer that was killed left in `out_dir` (the folder is held: no writer is running).

    Its marker names the files it could create (and an earlier write's, with --overwrite). If a manifest of
    recog's is there, the write got to its end but for removing the marker: only the marker goes. Otherwise
    exactly the files it names go (plain names in this folder, nothing else), then the marker."""
    marker = out_dir / MARKER
    if not marker.exists():
        return
    try:
        raw = json.loads(marker.read_text())
        files = raw["files"] if raw.get("format") == MARKER_FORMAT else None
    except (OSError, ValueError, AttributeError, KeyError):
        files = None
    if not isinstance(files, list):
        raise ConfigError(f"{marker} is not a shard writer's marker recog can read; move it away or choose another "
                          "output folder.")
    try:
        earlier_write(out_dir)
        finished = (out_dir / MANIFEST).exists()
    except ConfigError:
        finished = False
    if not finished:
        removed = 0
        for name in files:  # never a manifest: one of recog's means 'finished', another's is not ours
            if is_plain_name(name) and name not in (MARKER, LOCK_FILE, MANIFEST) and (out_dir / name).is_file():
                (out_dir / name).unlink()
                removed += 1
        log.warning("removed %d files left in %s by a shard write that did not finish (%s)", removed, out_dir,
                    raw.get("writer", "?"))
    marker.unlink()


def prepare_output(out_dir: Path, overwrite: bool, new_files: Sequence[str]) -> set[str]:
    """With `out_dir` held: finish a killed writer's business, then refuse a folder that holds anything (but
    recog's lock) unless `overwrite`, and with it refuse one where a file recog did not write would be replaced.
    Returns the files of an earlier write, for the caller to remove."""
    finish_dead_write(out_dir)
    present = {p.name for p in out_dir.iterdir()} - {LOCK_FILE}
    if not present:
        return set()
    if not overwrite:
        raise ConfigError(f"output folder {out_dir} is not empty; choose another folder or pass --overwrite.")
    ours = earlier_write(out_dir)
    for name in sorted(new_files):
        if name in present and name not in ours:
            raise ConfigError(f"{out_dir / name} is not listed in a manifest there, so it is not recog's to replace; "
                              "move it away or choose another output folder.")
    return ours & present


def write_marker(out_dir: Path, files: Sequence[str]) -> None:
    """Before this write creates or removes anything: the files it may create or remove, so that if it is killed
    the next write can remove exactly them (finish_dead_write)."""
    marker = {"format": MARKER_FORMAT, "writer": f"shard write, pid {os.getpid()} on {socket.gethostname()}",
              "files": sorted(files)}
    atomic_write(out_dir / MARKER, lambda f: f.write(json.dumps(marker, indent=1).encode()))


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
    """The image as decode_image gives it (grey or RGB, upright, 8 bits), encoded as `fmt`."""
    from PIL import Image

    pixels = decoder()(data, None)
    image = Image.fromarray(pixels[0].numpy() if len(pixels) == 1 else pixels.permute(1, 2, 0).numpy())
    out = io.BytesIO()
    image.save(out, format="JPEG" if fmt == "jpg" else fmt.upper(), quality=quality)
    return out.getvalue()


def decoder():
    """recog.data.decode's decode_image, imported on first use, as webdataset's TarWriter (tar_writer): they bring
    torch and its image libraries (seconds and ~700 MB at start), which a command refused for its input never
    needs. write_shards imports both before its writer processes fork."""
    from recog.data.decode import decode_image

    return decode_image


def tar_writer():
    from webdataset import TarWriter

    return TarWriter


_RECORDS: Sequence[Record] = ()  # the records a forked writer process reads (closures do not pickle)


STATS_SAMPLE = 5000  # images measured for the manifest's statistics: mean/std settle well before this


def check_image(data: bytes, measure: bool = False) -> tuple | None:
    """Raise if the bytes do not decode to a whole image: training would only skip it later.

    With `measure`: (grey?, height, width, per-channel sum, per-channel sum of squares, pixels), on [0, 1]
    RGB values (a grey image counts the same in each channel), for the manifest's statistics: of the pixels
    training sees (decode_image: upright, 16-bit images at 8 bits).
    """
    decoded = decoder()(data, None)
    if not measure:
        return None
    channels, height, width = decoded.shape
    pixels = decoded.reshape(channels, -1).T.numpy().astype(np.float64)
    pixels = np.broadcast_to(pixels / 255.0, (len(pixels), 3))
    return channels == 1, height, width, pixels.sum(0), (pixels ** 2).sum(0), len(pixels)


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


@dataclass(frozen=True)
class ShardJob:
    """One shard for one writer process: which records go into it, and how."""
    out_dir: Path
    name: str
    indices: list[int]  # into the records, in the order written
    reencode_to: str | None
    quality: int
    strict: bool
    sample: frozenset  # the indices measured for the manifest's statistics (STATS_SAMPLE)


def _write_shard(job: ShardJob):
    """Write one shard; return its ShardInfo (None if no image was readable), its labels,
    (key, offset, size) of each image inside the tar, (file, reason) of each image skipped, and the
    measurements of the images in `job.sample` (see check_image)."""
    with writing_to(job.out_dir):
        return _write_one_shard(job)


def _write_one_shard(job: ShardJob):
    tmp = job.out_dir / f".{job.name}.tmp"
    labels, skipped, measured = [], [], []
    with tar_writer()(str(tmp), encoder=False, mtime=0) as tar:  # fixed mtime: same input, same bytes
        for i in job.indices:
            rec = _RECORDS[i]
            data, ext = rec.read(), rec.ext
            try:
                found = None
                if job.reencode_to and ext != job.reencode_to:  # decodes the image: a check in itself
                    data, ext = reencode(data, job.reencode_to, job.quality), job.reencode_to
                elif rec.check:
                    found = check_image(data, measure=i in job.sample)
            except Exception as e:  # whatever the training-side decode would skip (PIL raises many kinds)
                why = "not an image" if isinstance(e, UnidentifiedImageError) else str(e)
                if job.strict:
                    raise ConfigError(f"image {rec.path or f'#{i}'} cannot be decoded ({why}); "
                                      "fix or remove it, or leave out --strict to skip unreadable images.") from None
                skipped.append((rec.path or f"#{i}", why))
                continue
            tar.write({"__key__": f"{i:09d}", ext: data, "cls": str(rec.label).encode()})
            labels.append(rec.label)
            if i in job.sample and found is None:  # re-encoded or unchecked: measured as written, if it decodes
                found = measure_quietly(data)
            if found is not None:
                measured.append(found)
    if not labels:  # a shard of unreadable images only: leave it out
        tmp.unlink()
        return None, labels, [], skipped, measured
    with tarfile.open(tmp, "r:") as tar:  # where each image's bytes landed: the random-access index
        places = [(m.name.split(".", 1)[0], m.offset_data, m.size) for m in tar if not m.name.endswith(".cls")]
    path = job.out_dir / job.name
    os.replace(tmp, path)
    return ShardInfo(job.name, len(labels), path.stat().st_size, sha256_of(path)), labels, places, skipped, measured


@dataclass
class Written:
    """What the shard writers reported, shard by shard in order: for the index, the manifest and the warnings."""
    class_counts: list[int]
    shards: list[ShardInfo] = field(default_factory=list)  # the shards written (one of unreadable images is not)
    labels: list[list[int]] = field(default_factory=list)  # per shard written
    places: list[list[tuple]] = field(default_factory=list)  # per shard written: (key, offset, size) of each image
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) of each unreadable image
    measured: list[tuple] = field(default_factory=list)  # check_image's measurements, for data_stats

    def add(self, info: ShardInfo | None, labels: list[int], places: list[tuple], skipped: list[tuple[str, str]],
            measured: list[tuple]) -> int:
        """One shard's report (_write_shard's); returns the number of images it went through."""
        self.measured += measured
        for path, reason in skipped:
            log.warning("skipped unreadable image %s (%s)", path, reason)
        self.skipped += skipped
        if info is not None:
            self.shards.append(info)
            self.labels.append(labels)
            self.places.append(places)
            for label in labels:
                self.class_counts[label] += 1
        return len(labels) + len(skipped)


def write_index(out_dir: Path, written: Written) -> str:
    """index.npz: for every sample, its shard, the offset and size of its image in the tar, its label and key."""
    counts = [len(x) for x in written.labels]
    places = written.places
    atomic_write(out_dir / INDEX, lambda f: np.savez(
             f, shard=np.repeat(np.arange(len(written.shards), dtype=np.int32), counts),
             offset=np.array([o for p in places for _, o, _ in p], dtype=np.int64),
             size=np.array([n for p in places for _, _, n in p], dtype=np.int64),
             key=np.array([k for p in places for k, _, _ in p], dtype=str),
             label=np.array([x for per_shard in written.labels for x in per_shard], dtype=np.int64),
             shard_names=np.array([s.name for s in written.shards])))
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
    overwrite: replace an earlier write's files in `out_dir` (its manifest is recog's, format recog-shards/1);
    no other file is ever removed or replaced. A killed writer's files (named in its marker) are removed with
    or without it. One writer per folder: a second one gets one sentence.
    sources: the folder, list file or idx files read, which `out_dir` must stay apart from.
    strict: stop at the first image that does not decode, instead of skipping it with a warning.
    workers: processes writing shards at once. reencode_to: 'jpg', 'png' or 'webp'
    re-encodes images in another format; None passes the bytes through.
    """
    check_settings(records, shard_samples, shard_mb, reencode_to, quality, workers)
    out_dir = Path(out_dir).resolve()
    order = list(range(len(records)))
    if shuffle:  # so a shard holds a mix of classes even when the source is sorted by class
        random.Random(seed).shuffle(order)
    sample = set(order[::max(1, len(order) // STATS_SAMPLE)])  # spread over the data, the same for any workers
    jobs = [ShardJob(out_dir, f"{prefix}-{n:06d}.tar", chunk, reencode_to, quality, strict,
                     frozenset(sample.intersection(chunk)))
            for n, chunk in enumerate(plan_shards(records, order, shard_samples, shard_mb))]
    inside = str(out_dir) + os.sep  # records' paths are resolved: a prefix test is exact, and fast for millions
    held = [Path(r.path) for r in records if r.path.startswith(inside)][:1]
    check_apart(out_dir, [Path(s).resolve() for s in sources] + held)
    new_files = files_of_write([job.name for job in jobs])
    with writing_to(out_dir):
        with exclusive(out_dir, "shard write"):  # the lock file is created in out_dir, now that it is apart
            earlier = prepare_output(out_dir, overwrite, new_files)
            write_marker(out_dir, [*new_files, *earlier])
            remove_earlier_write(out_dir, earlier)
            return _write_all(records, classes, out_dir, jobs, new_files, workers, progress)


def check_settings(records: Sequence[Record], shard_samples: int, shard_mb: float | None, reencode_to: str | None,
                   quality: int, workers: int) -> None:
    """write_shards' arguments, each refused in one sentence before anything is read or written."""
    if shard_samples < 1 or (shard_mb is not None and shard_mb <= 0):
        raise ConfigError(f"shard size must be positive (shard_samples={shard_samples}, shard_mb={shard_mb}).")
    if reencode_to not in (None, "jpg", "png", "webp"):
        raise ConfigError(f"cannot re-encode to '{reencode_to}'; use jpg, png or webp.")
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG/WebP quality {quality} is out of range (--quality); give 1 to 100.")
    if workers < 1:
        raise ConfigError(f"{workers} writer processes (--workers) cannot write; give 1 or more.")
    if not records:
        raise ConfigError("no samples to write; check the source.")


def files_of_write(shard_names: Sequence[str]) -> list[str]:
    """Every file a write of these shards may create: the shards, the index and the manifest, and their
    temporary names (`.NAME.tmp` for a shard, atomic_write's for the others)."""
    pid = os.getpid()
    return [*shard_names, *(f".{name}.tmp" for name in shard_names), INDEX, f".{INDEX}.tmp-{pid}", MANIFEST,
            f".{MANIFEST}.tmp-{pid}"]


def remove_earlier_write(out_dir: Path, earlier: set[str]) -> None:
    """Remove the files of an earlier write (prepare_output's), the manifest first: no longer 'complete'."""
    for name in sorted(earlier, key=lambda n: n != MANIFEST):
        if (out_dir / name).is_file() or (out_dir / name).is_symlink():  # never a folder
            (out_dir / name).unlink()


def _write_all(records: Sequence[Record], classes: Sequence[str], out_dir: Path, jobs: list[ShardJob],
               new_files: list[str], workers: int, progress: bool) -> Manifest:
    """write_shards' writing, with the folder held and the marker written: the shards, the index, the manifest;
    then the marker goes. On any failure every file of this write goes, the marker last."""
    global _RECORDS
    _RECORDS = records
    decoder(), tar_writer()  # imported once, before the pool forks, not in every writer process
    written = Written([0] * len(classes))
    bar = tqdm(total=len(records), desc=f"writing {out_dir}", unit="img", disable=not progress)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    complete = False
    try:
        for report in (pool.imap(_write_shard, jobs) if pool else map(_write_shard, jobs)):
            bar.update(written.add(*report))
        manifest = _write_index_and_manifest(out_dir, classes, written, len(records))
        complete = True
        (out_dir / MARKER).unlink()  # nothing here is left to remove
    except BaseException:  # a bad image under strict, an error, Ctrl-C: leave nothing of this write behind
        if pool:
            pool.terminate()  # first, so that no worker still writes what is removed here
        for name in new_files if not complete else ():  # a write interrupted once complete keeps its files
            (out_dir / name).unlink(missing_ok=True)
        (out_dir / MARKER).unlink(missing_ok=True)
        raise
    finally:
        if pool:
            pool.terminate()
        _RECORDS = ()
        bar.close()
    if written.skipped:
        log.warning("skipped %d unreadable images (first: %s)", len(written.skipped), written.skipped[0][0])
    return manifest


def _write_index_and_manifest(out_dir: Path, classes: Sequence[str], written: Written, images: int) -> Manifest:
    """The index, then the manifest: last, so that its presence means 'complete'."""
    if not written.shards:
        raise ConfigError(f"none of the {images} images could be decoded (first: {written.skipped[0][0]}); "
                          "check the source.")
    index = write_index(out_dir, written)
    manifest = Manifest(written.shards, list(classes), written.class_counts, root=str(out_dir), index=index,
                        stats=data_stats(written.measured) if written.measured else {})
    write_manifest(manifest, out_dir)
    return manifest


MEASURED_IMAGES, MEASURED_SHARDS = 1000, 10  # measure_shards reads this many images from up to this many shards


def measure_shards(manifest: Manifest, source=None) -> dict:
    """`data_stats` of shards whose manifest lacks them (written by another tool or an older recog): the
    first images of up to MEASURED_SHARDS shards spread over the set. Unreadable samples are left out."""
    from recog.data.decode import IMAGE_KEYS
    from recog.data.plan import Piece
    from recog.data.stream import read_pieces

    step = max(1, len(manifest.shards) // MEASURED_SHARDS)
    chosen = list(range(len(manifest.shards)))[::step][:MEASURED_SHARDS]
    per_shard = -(-MEASURED_IMAGES // len(chosen))
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
