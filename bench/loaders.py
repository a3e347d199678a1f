"""recog's shard loader against other data loaders: the same images, workers, batch size and augmentation, one rank.

    python bench/loaders.py --csv docs/loaders.csv --plot docs/loaders.png
    python bench/loaders.py --images 300 --png-images 1000 --rounds 1 --workdir /tmp/recog-loaders-small
    python bench/loaders.py --quick --workdir /tmp/recog-loaders-quick   # a first look: under 5 minutes

Images, written once into --workdir in each loader's own format and kept there for reruns:
  jpeg   --images synthetic photo-like JPEGs (bench/data.py's synthetic_jpeg), 500x375, quality 90 (~115 KB),
         10 classes;
  png28  the default job's images: the bundled Fashion-MNIST subset's training split (--png-images of its 10,000),
         28x28 grey PNGs encoded as recog's shard writer encodes them.
  Formats: recog's shards (WebDataset tars, 64 MB for jpeg, the default job's 1,000 images for png28), read by
  recog, by webdataset and (indexed with DALI's wds2idx) by DALI; an ImageFolder tree of the same files; MDS
  (MosaicML Streaming) and LitData chunks of the same bytes, shards of the same size.

Cases: {jpeg, png28} x {decode, bytes}.
  decode  decode each image, then jpeg: RandomResizedCrop(224) + horizontal flip (recog's augment=imagenet);
          png28: resize the shorter side to 28 and centre-crop (recog's augment=none: resize only, which leaves a
          28x28 image as it is). Batches of uint8 tensors (N, C, H, W), grey PNGs as one channel: recog
          normalises to float once per batch in the training process, so every loader stops at uint8.
  bytes   each sample's encoded bytes and its label, read in the workers, no decoding; a batch hands over each
          image's length in bytes and its label (see byte_counts: the encoded bytes are not pickled to the
          training process, which training never does either). DALI: its pipeline's outputs, in its own memory.

Loaders, each set up as its documentation shows (the one-line summaries are in bench/README.md):
  recog       decode: train.py's own loader, `recog.build.build_data` on the composed config (data=images,
              augment=imagenet or none); bytes: recog's epoch plan (recog.data.plan) read by
              recog.data.stream.read_pieces (by the shards' index) in recog's loader workers (make_loader)
  webdataset  WebDataset(shards).shuffle(1000).decode("pil").to_tuple(...).map_tuple(...).batched(...), WebLoader
  mds         streaming.StreamingDataset (StreamingImageNet for the JPEGs) + torch DataLoader
  litdata     litdata.optimize(...) once, then a StreamingDataset subclass + StreamingDataLoader
  imagefolder torchvision ImageFolder (DatasetFolder for bytes) + DataLoader(shuffle=True)
  dali        DALI's CPU pipeline (device_id=None): fn.readers.webdataset + decoders + resize + crop_mirror_normalize,
              DALIGenericIterator; its rows are skipped, with one line, where nvidia-dali is not installed

Every loader gets --workers worker processes (DALI: that many CPU threads), --batch-size, shuffles, and keeps its
workers between epochs. Per case, every loader first runs --warmup epochs (workers started, files in the page cache,
decoded images kept where recog keeps them: see WARMUP), then --rounds epochs each, in rotating order. The table
reports the median images/s of its rounds and recog's images/s divided by the loader's (> 1: recog is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import markdown_table, medians, require, rounds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

ROOT = Path(__file__).resolve().parents[1]
PHOTO = {"size": (500, 375), "quality": 90, "noise": (20, 45)}  # synthetic_jpeg: ~100-130 KB, like ImageNet
CLASSES = 10
JPEG_SHARD_MB = 64  # recog's tars; MDS's default shard size limit and LitData's usual chunk_bytes are 64 MB too
PNG_SHARD_SAMPLES = 1000  # the default job's shards (conf/data/fashion_mnist_small.yaml)
SHUFFLE_BUFFER = 1000  # recog's data.shuffle_block; webdataset's shuffle(1000) in its examples
LOADERS = ("recog", "webdataset", "mds", "litdata", "imagefolder", "dali")
# Warm-up epochs per set. png28: recog keeps the decoded images in each worker (data.keep_decoded_mb), and a worker
# skips reading a shard's piece only once it holds every image of it; as the worker split changes each epoch, each
# worker holds them all after ~4 epochs (measured: 13k, 16k, 28k, 37k, 31k images/s in epochs 2-6), the first
# third of the default job's 10.
WARMUP = {"jpeg": 1, "png28": 4}


@dataclass
class ImageSet:
    """One image set in every loader's format, under root."""

    name: str  # "jpeg" or "png28"
    root: Path
    ext: str  # the image's extension in the tars and the class folders
    channels: int
    size: int  # the side of the images a decode case produces

    @property
    def loose(self) -> Path:
        return self.root / "loose"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def tars(self) -> list[str]:
        return sorted(str(p) for p in self.shards.glob("*.tar"))

    def dali_index(self) -> list[str]:
        return [str(self.root / "dali-index" / (Path(t).stem + ".idx")) for t in self.tars()]

    def count(self) -> int:
        return json.loads((self.root / "complete.json").read_text())["images"]


# ---- writing the image sets, once -------------------------------------------------------------------------------


def class_folder(label: int) -> str:
    return f"class{label:02d}"


def write_jpeg_set(s: ImageSet, count: int) -> None:
    from data import synthetic_jpeg
    from recog.data.write import folder_records, write_shards

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = s.loose / class_folder(i % CLASSES)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(synthetic_jpeg(rng, **PHOTO))
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1} of {count} JPEGs", flush=True)
    records, classes = folder_records(s.loose)
    write_shards(records, classes, s.shards, shard_samples=10**9, shard_mb=JPEG_SHARD_MB, shuffle=True,
                 progress=False)


def write_png_set(s: ImageSet, count: int) -> None:
    """The default job's shards (recog/data/prepare.py writes them so), and the same PNG bytes as class folders."""
    from recog.data.idx import find_idx_pair
    from recog.data.write import FASHION_MNIST_CLASSES, idx_records, write_shards

    records, classes = idx_records(*find_idx_pair(ROOT / "data" / "fashion-mnist-subset", "train"),
                                   FASHION_MNIST_CLASSES)
    records = records[:count]
    write_shards(records, classes, s.shards, prefix="train", shard_samples=PNG_SHARD_SAMPLES, progress=False)
    for i, record in enumerate(records):
        folder = s.loose / class_folder(record.label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.png").write_bytes(record.read())


def loose_files(s: ImageSet) -> list[tuple[str, int]]:
    """(path, label) of the class folders, in ImageFolder's order."""
    from torchvision.datasets.folder import make_dataset

    classes = sorted(p.name for p in s.loose.iterdir())
    return make_dataset(str(s.loose), {c: i for i, c in enumerate(classes)}, extensions=(f".{s.ext}",))


def write_mds(s: ImageSet, shard_bytes: int) -> None:
    """streaming's ImageNet conversion (streaming/vision/convert/imagenet.py): columns x (the image) and y (the
    class), written with MDSWriter from PIL images opened from the files (a JPEG's bytes are kept as they are);
    and the same with the raw bytes ('bytes' encoding) for the bytes case."""
    from PIL import Image
    from streaming import MDSWriter

    files = loose_files(s)
    for kind, encoding in (("image", "jpeg" if s.ext == "jpg" else "png"), ("bytes", "bytes")):
        with MDSWriter(out=str(s.root / f"mds-{kind}"), columns={"x": encoding, "y": "int"},
                       size_limit=shard_bytes) as out:
            for path, label in files:
                out.write({"x": Image.open(path) if kind == "image" else Path(path).read_bytes(), "y": label})


def litdata_image(item: tuple[str, int]) -> dict:
    """LitData's advice for existing JPEG files: `litdata.Image(path=...)` stores the file's bytes as they are."""
    import litdata

    path, label = item
    return {"image": litdata.Image(path=path), "cls": label}


def litdata_bytes(item: tuple[str, int]) -> dict:
    path, label = item
    return {"image": Path(path).read_bytes(), "cls": label}


def write_litdata(s: ImageSet, shard_bytes: int) -> None:
    """litdata.optimize sets this process's multiprocessing start method to spawn (force=True), under which the
    other loaders' workers could not take their local functions: the method this process had is put back after."""
    import multiprocessing

    import litdata

    files = loose_files(s)
    method = multiprocessing.get_start_method(allow_none=True)
    try:
        for kind, fn in (("image", litdata_image), ("bytes", litdata_bytes)):
            litdata.optimize(fn=fn, inputs=files, output_dir=str(s.root / f"litdata-{kind}"),
                             chunk_bytes=shard_bytes, num_workers=1, verbose=False)
    finally:
        multiprocessing.set_start_method(method, force=True)


def write_dali_index(s: ImageSet) -> None:
    """DALI's webdataset reader reads an index per tar, made by the wds2idx tool it ships."""
    from wds2idx import IndexCreator

    (s.root / "dali-index").mkdir(exist_ok=True)
    for tar, idx in zip(s.tars(), s.dali_index(), strict=True):
        with IndexCreator(tar, idx) as creator, contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            creator.create_index()


def prepare(s: ImageSet, count: int, dali: bool) -> None:
    """Write the set in every format unless the workdir holds it already at this count."""
    done = s.root / "complete.json"
    if done.is_file() and s.count() == count and (not dali or all(Path(p).is_file() for p in s.dali_index())):
        return
    shutil.rmtree(s.root, ignore_errors=True)
    s.root.mkdir(parents=True)
    start = time.perf_counter()
    print(f"writing the {s.name} set ({count} images) in every format under {s.root} ...", flush=True)
    (write_jpeg_set if s.name == "jpeg" else write_png_set)(s, count)
    shard_bytes = max(1 << 16, round(sum(p.stat().st_size for p in s.shards.glob("*.tar")) / len(s.tars())))
    write_mds(s, shard_bytes)
    write_litdata(s, shard_bytes)
    if dali:
        write_dali_index(s)
    done.write_text(json.dumps({"images": count}))
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


# ---- the loaders: each returns one epoch's iterator of batches and how to count a batch's images ---------------


@dataclass
class Loader:
    epoch: Callable[[], Iterator]  # a fresh iterator over one epoch
    images: Callable[[object], int]  # the images in one of its batches
    pixels: Callable[[object], torch.Tensor] | None = None  # a decode case's batch of images


def augment(s: ImageSet, pil: bool):
    """The decode case's transform, on a uint8 tensor (C, H, W) or, with pil, on a PIL image (then to uint8)."""
    from torchvision.transforms import v2

    if s.name == "jpeg":
        ops = [v2.RandomResizedCrop(s.size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops = [v2.Resize(s.size, antialias=True), v2.CenterCrop(s.size)]
    return v2.Compose(ops + [v2.PILToTensor()] if pil else ops)


def recog_decode(s: ImageSet, workers: int, batch_size: int, keep_decoded: bool = True) -> Loader:
    """train.py's data: the composed config, built by recog.build.build_data as train.py builds it."""

    from recog.build import build_data
    from recog.config import check_config
    from recog.data.position import Position
    from recog.dist import Dist
    from recog.rundir import compose_train_config

    overrides = ["data=images", f"data.train={s.shards}", f"data.test={s.shards}", f"batch_size={batch_size}",
                 f"augment={'imagenet' if s.name == 'jpeg' else 'none'}", f"data.num_workers={workers}"]
    if not keep_decoded:
        overrides.append("data.keep_decoded_mb=0")
    cfg = compose_train_config(*overrides)
    check_config(cfg)
    data = build_data(cfg, Dist(0, 0, 1, 1, torch.device("cpu"), None))
    assert cfg.data.image_size == s.size and cfg.data.channels == s.channels, (cfg.data.image_size, cfg.data.channels)
    epochs = itertools.count()

    def epoch():
        return data.batches(Position(epoch=next(epochs)))

    return Loader(epoch, lambda b: len(b.labels), lambda b: b.images)


class RecogBytes(IterableDataset):
    """Bytes only, through recog's reading: one rank's epoch as ShardStream plans it (one micro-batch, recog.data.plan),
    this worker's steps of it, read by recog.data.stream.read_pieces through a MicroBatchReader (shuffled within
    blocks; these photos read sample by sample, as ShardStream reads them: recog.data.stream.by_sample), in batches
    of (encoded images, labels). ShardStream is this plus decoding, the transform and the per-batch bookkeeping."""

    def __init__(self, shards: Path, batch_size: int):
        from recog.data.manifest import load_manifest

        self.manifest, self.batch_size = load_manifest(shards), batch_size
        self.offsets = None  # the shards' index, loaded once per worker as ShardStream loads it

    def __iter__(self):
        from recog.data.decode import IMAGE_KEYS
        from recog.data.offsets import ShardOffsets
        from recog.data.plan import MicroBatchPlan, epoch_steps, worker_steps
        from recog.data.source import ShardSource
        from recog.data.stream import MicroBatchReader, by_sample, read_pieces

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.offsets is None:
            self.offsets = ShardOffsets.load(self.manifest, ShardSource())
        steps = worker_steps(epoch_steps(self.manifest.num_samples, 1, self.batch_size), worker, workers)
        plan = MicroBatchPlan.make(self.manifest.shard_sizes, 0, 1, batch_size=self.batch_size,
                                   block=SHUFFLE_BUFFER, epoch=0, seed=0)
        reader = MicroBatchReader(plan, steps,
                                  lambda pieces: read_pieces(self.manifest, pieces, True, offsets=self.offsets),
                                  by_sample(self.offsets, plan.pieces))
        for step in steps:
            chunk = reader.step(step)
            key = next(k for k in IMAGE_KEYS if k in chunk[0])
            yield byte_counts([(sample[key], sample["cls"]) for sample in chunk])


def byte_counts(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes case's batch: each sample's encoded length and label. (The encoded bytes themselves are not
    pickled to the training process: training never sends them there, and doing so would add the same cost to
    every loader with worker processes and none to DALI, whose threads share the process.)"""
    pairs = [tuple(s.values()) if isinstance(s, dict) else s for s in samples]
    return torch.tensor([len(data) for data, _ in pairs]), torch.tensor([int(label) for _, label in pairs])


def recog_bytes(s: ImageSet, workers: int, batch_size: int) -> Loader:
    from recog.data.loader import make_loader

    loader = make_loader(RecogBytes(s.shards, batch_size), workers, pin_memory=False)
    return Loader(lambda: iter(loader), lambda b: len(b[0]))


def webdataset_loader(s: ImageSet, workers: int, batch_size: int, decode: bool) -> Loader:
    """webdataset's own training example: shuffled shards, a sample shuffle buffer, PIL decoding, the torchvision
    transform in map_tuple, batches made in the workers (WebLoader with batch_size=None)."""
    import webdataset as wds

    dataset = wds.WebDataset(s.tars(), shardshuffle=100, empty_check=False).shuffle(SHUFFLE_BUFFER)
    if decode:  # "pil" is RGB, "pill" grey
        transform = augment(s, pil=True)
        dataset = dataset.decode("pil" if s.channels == 3 else "pill").to_tuple(s.ext, "cls")
        dataset = dataset.map_tuple(transform, lambda label: label)
    else:
        dataset = dataset.to_tuple(s.ext, "cls")
    batched = dataset.batched(batch_size) if decode else dataset.batched(batch_size, collation_fn=byte_counts)
    loader = wds.WebLoader(batched, batch_size=None, num_workers=workers, persistent_workers=True)
    return Loader(lambda: iter(loader), lambda b: len(b[1]), lambda b: b[0])


def mds_loader(s: ImageSet, workers: int, batch_size: int, decode: bool) -> Loader:
    """streaming's StreamingImageNet (StreamingVisionDataset for the PNGs) with its transform, or a plain
    StreamingDataset of raw bytes; both given the batch size, as streaming asks, and a torch DataLoader."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from streaming.vision import StreamingImageNet
    from streaming.vision.base import StreamingVisionDataset

    clean_stale_shared_memory()
    if decode:
        kind = StreamingImageNet if s.name == "jpeg" else StreamingVisionDataset
        dataset = kind(local=str(s.root / "mds-image"), shuffle=True, batch_size=batch_size,
                       transform=augment(s, pil=True))
    else:
        dataset = StreamingDataset(local=str(s.root / "mds-bytes"), shuffle=True, batch_size=batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=True,
                        collate_fn=None if decode else byte_counts)
    return Loader(lambda: iter(loader), lambda b: len(b[1]), lambda b: b[0])


def litdata_dataset(transform, channels: int):
    """LitData's "custom data transforms": a StreamingDataset subclass whose __getitem__ transforms (its samples
    are dicts {"image", "cls"}). Without a transform: the raw bytes (a memoryview into litdata's chunk)."""
    import litdata

    class LitImages(litdata.StreamingDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            if transform is None:
                return sample["image"], sample["cls"]
            image = sample["image"]  # decoded by litdata with torchvision, always to RGB
            return transform(image[:channels]), sample["cls"]

    return LitImages


def litdata_loader(s: ImageSet, workers: int, batch_size: int, decode: bool) -> Loader:
    import litdata

    dataset = litdata_dataset(augment(s, pil=False) if decode else None, s.channels)(
        str(s.root / f"litdata-{'image' if decode else 'bytes'}"), shuffle=True)
    loader = litdata.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         persistent_workers=True, collate_fn=None if decode else byte_counts)
    return Loader(lambda: iter(loader), lambda b: len(b[1]), lambda b: b[0])


def open_rgb(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def open_grey(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("L")


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def imagefolder_loader(s: ImageSet, workers: int, batch_size: int, decode: bool) -> Loader:
    """torchvision's classification reference: ImageFolder with PIL-loading and the transform, DataLoader with
    shuffle; bytes: DatasetFolder with a loader that only reads the file."""
    from torchvision.datasets import DatasetFolder, ImageFolder

    if decode:
        dataset = ImageFolder(str(s.loose), transform=augment(s, pil=True),
                              loader=open_rgb if s.channels == 3 else open_grey)
    else:
        dataset = DatasetFolder(str(s.loose), loader=read_bytes, extensions=(f".{s.ext}",))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True,
                        collate_fn=None if decode else byte_counts)
    return Loader(lambda: iter(loader), lambda b: len(b[1]), lambda b: b[0])


def dali_loader(s: ImageSet, workers: int, batch_size: int, decode: bool) -> Loader:
    """DALI's ResNet-50 training example on its CPU backend: decoders.image_random_crop (decodes only the crop's
    part of a JPEG), resize with a triangular (antialiasing) filter, crop_mirror_normalize with a random mirror,
    here kept uint8 and CHW. PNGs: decoders.image to grey, resize_shorter, a centre crop. Bytes: the reader alone."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(batch_size=batch_size, num_threads=workers, device_id=None, seed=0)
    def pipeline():
        data, label = fn.readers.webdataset(paths=s.tars(), index_paths=s.dali_index(), ext=[s.ext, "cls"],
                                            missing_component_behavior="error", random_shuffle=True,
                                            initial_fill=SHUFFLE_BUFFER, pad_last_batch=not decode, name="reader")
        if not decode:
            return data, label
        if s.name == "jpeg":
            images = fn.decoders.image_random_crop(data, device="cpu", output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                   num_attempts=10)
            images = fn.resize(images, resize_x=s.size, resize_y=s.size, interp_type=types.INTERP_TRIANGULAR)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(data, device="cpu", output_type=types.GRAY)
            images = fn.resize(images, resize_shorter=s.size, interp_type=types.INTERP_TRIANGULAR)
            mirror = 0
        images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", crop=(s.size, s.size),
                                          mirror=mirror)
        return images, label

    pipe = pipeline()
    pipe.build()
    if decode:
        loader = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                     last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        return Loader(lambda: iter(loader), lambda b: len(b[0]["labels"]), lambda b: b[0]["images"])
    # The encoded images differ in length, which DALIGenericIterator (dense torch tensors) refuses: the pipeline's
    # own outputs (TensorListCPU: each sample's bytes, in DALI's memory). An epoch: ceil(images / batch) runs, the
    # last one padded (pad_last_batch), each yielding the count of its images that belong to the epoch.
    total = pipe.epoch_size("reader")

    def epoch():
        for start in range(0, total, batch_size):
            pipe.run()
            yield min(batch_size, total - start)

    return Loader(epoch, lambda n: n)


def build(name: str, s: ImageSet, mode: str, workers: int, batch_size: int) -> Loader:
    decode = mode == "decode"
    if name == "recog":
        return (recog_decode if decode else recog_bytes)(s, workers, batch_size)
    if name == "recog, decoding every epoch":
        return recog_decode(s, workers, batch_size, keep_decoded=False)
    return {"webdataset": webdataset_loader, "mds": mds_loader, "litdata": litdata_loader,
            "imagefolder": imagefolder_loader, "dali": dali_loader}[name](s, workers, batch_size, decode)


# ---- measuring --------------------------------------------------------------------------------------------------


def one_epoch(loader: Loader, expected: int, check: Callable[[object], None] | None = None) -> tuple[int, float]:
    """The images of one epoch and its images/s, from asking for its first batch to its last. check: called on the
    first batch. An epoch of MosaicML Streaming repeats a few images so that its workers get whole batches alike:
    they are counted, as they cost the same work."""
    start, count = time.perf_counter(), 0
    for batch in loader.epoch():
        if check and not count:
            check(batch)
        count += loader.images(batch)
    seconds = time.perf_counter() - start
    assert expected <= count <= expected * 1.05 + 256, f"an epoch gave {count} images, not {expected}"
    return count, count / seconds


def measure_case(s: ImageSet, mode: str, names: list[str], args) -> dict[str, list[float]]:
    """Build every loader of this case, warm each up, then time --rounds epochs each, alternating."""
    count = s.count()
    loaders = {}
    for name in names:
        loader = loaders[name] = build(name, s, mode, args.workers, args.batch_size)

        def check(batch, name=name, loader=loader):  # every loader hands over the same kind of batch
            if loader.pixels and mode == "decode":
                images = loader.pixels(batch)
                assert images.dtype == torch.uint8 and images.shape[1:] == (s.channels, s.size, s.size), \
                    (name, images.dtype, images.shape)

        for _ in range(args.warmup or WARMUP[s.name]):
            images, rate = one_epoch(loader, count, check)
        padded = f", {images} images an epoch" if images != count else ""
        print(f"  {s.name} {mode}: {name} warmed up ({rate:.0f} images/s{padded})", flush=True)
    return rounds({name: (lambda _r, ld=loader: one_epoch(ld, count)[1]) for name, loader in loaders.items()},
                  args.rounds)


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    names = sorted(dict.fromkeys(r["loader"] for r in rows), key=lambda n: not n.startswith("recog"))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rate = {r["case"]: r["images_per_s"] for r in rows if r["loader"] == name}
        xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(cases))]
        ax.bar(xs, [rate.get(c, 0) for c in cases], width, label=name)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_yscale("log")
    ax.set_ylabel("images/s (log scale)")
    ax.set_title("one rank, the same images, workers and batch size")
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="JPEGs to generate (5000)")
    parser.add_argument("--png-images", type=int, default=10000, help="of the default job's 10,000 PNGs (all)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per loader (DALI: threads)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per loader and case, after a warm-up")
    parser.add_argument("--warmup", type=int, help="epochs before the timed ones (default: jpeg 1, png28 4)")
    parser.add_argument("--sets", default="jpeg,png28", help="which image sets (jpeg,png28)")
    parser.add_argument("--modes", default="decode,bytes", help="which cases (decode,bytes)")
    parser.add_argument("--loaders", default=",".join(LOADERS), help="which loaders (recog always runs)")
    parser.add_argument("--workdir", default="/tmp/recog-bench-loaders")
    parser.add_argument("--quick", action="store_true",
                        help="a first look in under 5 minutes: 500 JPEGs, 2,000 PNGs, 2 rounds after 1 warm-up epoch")
    parser.add_argument("--csv", help="write the figures here")
    parser.add_argument("--plot", help="write a bar chart here (PNG)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.png_images, args.rounds, args.warmup = 500, 2000, 2, 1
    require("webdataset", "streaming", "litdata", *(["matplotlib"] if args.plot else []))
    import importlib.util

    names = ["recog"] + [n for n in args.loaders.split(",") if n and n != "recog"]
    if "dali" in names and importlib.util.find_spec("nvidia.dali") is None:
        print("DALI (nvidia-dali) is not installed here: its rows are left out.")
        names.remove("dali")
    torch.set_num_threads(1)

    workdir = Path(args.workdir)
    sets = {"jpeg": ImageSet("jpeg", workdir / "jpeg", "jpg", 3, 224),
            "png28": ImageSet("png28", workdir / "png28", "png", 1, 28)}
    counts = {"jpeg": args.images, "png28": args.png_images}
    chosen = [sets[n] for n in args.sets.split(",")]
    for s in chosen:
        prepare(s, counts[s.name], "dali" in names)

    rows = []
    for s in chosen:
        files = [p.stat().st_size for p in s.loose.rglob(f"*.{s.ext}")]
        print(f"{s.name}: {len(files)} images, mean {np.mean(files) / 1e3:.1f} KB; {len(s.tars())} shards", flush=True)
        for mode in args.modes.split(","):
            case_names = list(names)
            if mode == "decode" and s.name == "png28":  # recog keeps these decoded after its first epoch
                case_names.insert(1, "recog, decoding every epoch")
            figures = measure_case(s, mode, case_names, args)
            for name, rate in medians(figures).items():
                rows.append({"case": f"{s.name} {mode}", "loader": name, "images_per_s": rate,
                             "rounds": " ".join(f"{v:.0f}" for v in figures[name])})
    for r in rows:
        recog = next(x["images_per_s"] for x in rows if x["case"] == r["case"] and x["loader"] == "recog")
        r["recog_ratio"] = recog / r["images_per_s"]

    print()
    print("\n".join(markdown_table(["case", "loader", "images/s", "recog / loader", "rounds"],
                                   [(r["case"], r["loader"], f"{r['images_per_s']:,.0f}", f"{r['recog_ratio']:.2f}",
                                     r["rounds"]) for r in rows], "llrrl")))
    for case in dict.fromkeys(r["case"] for r in rows):
        peers = [r for r in rows if r["case"] == case and not r["loader"].startswith("recog")]
        if peers:
            best = max(peers, key=lambda r: r["images_per_s"])
            print(f"{case}: recog / fastest peer ({best['loader']}) = {best['recog_ratio']:.2f}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, ["case", "loader", "images_per_s", "recog_ratio", "rounds"])
            writer.writeheader()
            writer.writerows({**r, "images_per_s": round(r["images_per_s"], 1),
                              "recog_ratio": round(r["recog_ratio"], 3)} for r in rows)
        print(f"wrote {args.csv}")
    if args.plot:
        write_plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
