"""Loose image files against WebDataset shards, on local disk and over HTTP, measured side by side.

    python bench/data.py                     # 2,000 synthetic 224x224 JPEGs (~15-30 KB), 3 rounds
    python bench/data.py --images 5000 --rounds 5
    python bench/data.py --default-job         # the default job's loader CPU per sample (28x28 PNG shards)

One process, no data-loader workers: the figures are images/s per core. Each
round runs every case once (as many passes as fill --min-seconds), in rotating order, and the table reports medians
(this machine is shared and noisy). Local files sit in the page cache (they
were just written), so local cases measure CPU cost, not disk. The HTTP server
is Python's http.server in its own process on 127.0.0.1, HTTP/1.0: like small
files on shared network storage, each loose image costs a request.

Cases (decode = full pipeline of a worker: JPEG decode, RandomResizedCrop, flip, batching):
  loose/local, shards/local, loose/http (a request per image),
  shards/http first epoch (download into an empty node cache, then read),
  shards/http streamed (no cache), shards/cache (a warm node cache),
  shards/local tar headers (bytes: the shards read member by member, as without their index),
  loose/local cold, shards/local cold (bytes: the page cache dropped before each pass; root only).
Shards are read by the offsets of their index, loaded once per run as a worker loads it once per run;
the first-epoch cases load it within the pass.

--default-job: the CPU time (time.process_time) a loader spends per sample of the default job's first
epoch (the bundled 10,000 28x28 PNGs, augment=small): shards read by their index, PNGs decoded by
TorchCodec (recog now), against through their tar headers with the same decoder, and with PIL (recog
before). Later epochs of the default job read nothing: its images are kept decoded.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import medians, rounds, timed
from loose import LooseImages, image_folder
from PIL import Image
from torchvision.transforms import v2

from recog.data.manifest import load_manifest
from recog.data.offsets import ShardOffsets
from recog.data.plan import rank_pieces
from recog.data.source import ShardSource
from recog.data.stream import ShardStream, read_pieces
from recog.data.write import folder_records, write_shards


def synthetic_jpeg(rng: np.random.Generator, size: int | tuple[int, int] = 224, quality: int = 85,
                   noise: tuple[float, float] = (7, 22)) -> bytes:
    """A photo-like image: smooth colour regions plus fine texture (grain of a standard deviation drawn from
    `noise`); size: a square's side, or (width, height). The defaults: ~15-30 KB. 500x375 at quality 90 with
    noise (20, 45): ~100-130 KB, like an ImageNet photo (bench/loaders.py)."""
    width, height = (size, size) if isinstance(size, int) else size
    low = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = rng.normal(0, rng.uniform(*noise), (height, width, 1))
    pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def generate(workdir: Path, count: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = workdir / "loose" / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(synthetic_jpeg(rng))
    records, names = folder_records(workdir / "loose")
    write_shards(records, names, workdir / "shards", shard_mb=10, shuffle=True, progress=False)


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the benchmark's HTTP server did not start")


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that the next read comes from the disk; False if not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class TarPathStream(ShardStream):
    """recog's stream as it reads shards that have no index: member by member, through their tar headers."""

    def offsets(self) -> ShardOffsets:
        return ShardOffsets({})


def default_job(args) -> None:
    """Loader CPU seconds per sample, the default job's first epoch: by index against through the tar headers."""
    from unittest.mock import patch

    from recog.data import decode
    from recog.data.augment import FitSize, RandomFlip, RandomShift
    from recog.data.prepare import write_idx_split

    shards = Path(args.workdir) / "default-job"
    if not (shards / "manifest.json").is_file():
        write_idx_split(Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-subset", "train", shards,
                        "fashion_mnist", shard_samples=1000, progress=False)
    manifest = load_manifest(shards)
    augment = v2.Compose([FitSize(28), RandomShift(4), RandomFlip(0.5)])  # conf/augment/small.yaml at 28 px

    def cpu_per_sample(kind, png_decoder):
        def run(_round):
            stream = kind(manifest, rank=0, world_size=1, batch_size=256, transform=augment, train=True)
            start = time.process_time()
            with patch.object(decode, "decode_png", png_decoder):
                count = sum(len(b.labels) for b in stream)
            assert count == manifest.num_samples, count
            return (time.process_time() - start) / count * 1e6
        return run

    rates = rounds({"index, TorchCodec PNG": cpu_per_sample(ShardStream, decode.decode_png),
                    "tar headers, TorchCodec PNG": cpu_per_sample(TarPathStream, decode.decode_png),
                    "tar headers, PIL PNG (before)": cpu_per_sample(TarPathStream, None)}, args.rounds, progress=True)
    med = medians(rates)
    print(f"\nloader CPU per sample, first epoch of the default job ({manifest.num_samples} images, {args.rounds} "
          "rounds, median):")
    for name, figures in rates.items():
        print(f"  {name:<30} {med[name]:6.0f} µs   (" + " ".join(f"{v:.0f}" for v in figures) + ")")
    now, before = med["index, TorchCodec PNG"], med["tar headers, PIL PNG (before)"]
    print(f"  index / tar headers, both TorchCodec = {now / med['tar headers, TorchCodec PNG']:.2f}")
    print(f"  now / before = {now / before:.2f} (target <= 0.70)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", default="/tmp/recog-bench-data")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="a case's passes in a round add up to this")
    parser.add_argument("--default-job", action="store_true", help="the default job's loader CPU per sample")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.default_job:
        return default_job(args)

    workdir = Path(args.workdir)
    if not (workdir / "shards" / "manifest.json").is_file() or len(list(workdir.glob("loose/*/*.jpg"))) != args.images:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"generating {args.images} JPEGs and their shards in {workdir} ...", flush=True)
        generate(workdir, args.images)
    loose = image_folder(workdir / "loose")
    sizes = [Path(p).stat().st_size for p, _ in loose]
    manifest = load_manifest(workdir / "shards")
    print(f"{len(loose)} images, mean {statistics.mean(sizes) / 1e3:.1f} KB (min {min(sizes) / 1e3:.1f}, "
          f"max {max(sizes) / 1e3:.1f}); {len(manifest.shards)} shards of ~{manifest.shards[0].bytes / 1e6:.1f} MB")

    server, url = start_server(workdir)
    loose_http = [(url + "/" + str(Path(p).relative_to(workdir)), label) for p, label in loose]
    remote = load_manifest(f"{url}/shards", ShardSource())
    warm_cache = workdir / "cache-warm"
    for i in range(len(remote.shards)):
        ShardSource(cache_dir=str(warm_cache)).cached(remote.url(i), remote.shards[i].sha256)

    # what conf/data/images.yaml does: augment uint8 images in the worker; recog.data.stream.Normalize
    # turns the batch into floats afterwards, once per batch (in the training process, or on the GPU)
    augment = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])

    def shards_decode(m, source):
        stream = ShardStream(m, rank=0, world_size=1, batch_size=args.batch_size, transform=augment, channels=3,
                             train=True, source=source)
        return sum(len(b.labels) for b in stream)

    offsets = {"local": ShardOffsets.load(manifest, ShardSource()), "remote": ShardOffsets.load(remote, ShardSource())}

    def shards_bytes(m, source, where=None):
        pieces = rank_pieces(m.shard_sizes, 0, 1, shuffle=False)
        index = offsets[where] if where else ShardOffsets.load(m, source)  # None: within the pass
        return sum(1 for s in read_pieces(m, pieces, strict=True, source=source, offsets=index) if s is not None)

    def tar_headers(m, source):
        pieces = rank_pieces(m.shard_sizes, 0, 1, shuffle=False)
        return sum(1 for s in read_pieces(m, pieces, strict=True, source=source) if s is not None)

    def loose_run(items, decode):
        data = LooseImages(items, args.batch_size, channels=3, transform=augment, decode=decode)
        return sum(len(b) if not decode else len(b.labels) for b in data)

    def cold(fn):
        def run():
            cache = workdir / "cache-cold"
            shutil.rmtree(cache, ignore_errors=True)
            return fn(remote, ShardSource(cache_dir=str(cache)))
        return run

    cases = {
        "loose/local bytes": lambda: loose_run(loose, False),
        "shards/local bytes": lambda: shards_bytes(manifest, ShardSource(), "local"),
        "shards/local tar headers bytes": lambda: tar_headers(manifest, ShardSource()),
        "loose/http bytes": lambda: loose_run(loose_http, False),
        "shards/http first epoch bytes": cold(shards_bytes),
        "shards/http streamed bytes": lambda: shards_bytes(remote, ShardSource(cache_dir=None), "remote"),
        "shards/cache bytes": lambda: shards_bytes(remote, ShardSource(cache_dir=str(warm_cache)), "remote"),
        "loose/local decode": lambda: loose_run(loose, True),
        "shards/local decode": lambda: shards_decode(manifest, ShardSource()),
        "loose/http decode": lambda: loose_run(loose_http, True),
        "shards/http first epoch decode": cold(shards_decode),
        "shards/cache decode": lambda: shards_decode(remote, ShardSource(cache_dir=str(warm_cache))),
    }

    cold_cache = drop_page_cache()
    if cold_cache:
        cases["loose/local cold bytes"] = lambda: loose_run(loose, False)
        cases["shards/local cold bytes"] = lambda: shards_bytes(manifest, ShardSource(), "local")
    else:
        print("the cold page-cache cases are left out: dropping the page cache needs root")

    def images_per_s(name):
        def run(_round):
            count, seconds = 0, 0.0
            while seconds < args.min_seconds or not count:  # short passes repeat: one pass of bytes is ~50 ms
                if " cold " in name:
                    drop_page_cache()
                n, t = timed(cases[name])
                assert n == len(loose), (name, n)
                count, seconds = count + n, seconds + t
            return count / seconds
        return run

    names = list(cases)
    try:
        for name in names:  # one pass of each first, not counted: lazy imports, first reads of the cache
            cases[name]()
        # the order rotates each round
        rates = rounds({name: images_per_s(name) for name in names}, args.rounds, progress=True)
    finally:
        server.terminate()

    med = medians(rates)
    print(f"\n{'case':<32} {'images/s (median)':>18} {'rounds':>30}")
    for name in names:
        print(f"{name:<32} {med[name]:>18.0f}   " + " ".join(f"{v:.0f}" for v in rates[name]))
    print("\nratios (each against its matching baseline, same run):")
    checks = [
        ("shards/http first epoch bytes", "loose/http bytes", 5.0),
        ("shards/http streamed bytes", "loose/http bytes", 5.0),
        ("shards/local decode", "loose/local decode", 0.95),
        ("shards/local bytes", "loose/local bytes", 1.0),
        ("shards/local tar headers bytes", "loose/local bytes", None),
        ("shards/local cold bytes", "loose/local cold bytes", 1.0),
        ("shards/http first epoch decode", "loose/http decode", None),
        ("shards/cache decode", "shards/local decode", 0.95),
        ("shards/cache bytes", "shards/local bytes", 0.95),
    ]
    for a, b, target in checks:
        if a not in med:
            continue
        ratio = med[a] / med[b]
        verdict = "" if target is None else (f"  target >= {target}: " + ("met" if ratio >= target else "MISSED"))
        print(f"  {a} / {b} = {ratio:.2f}{verdict}")


if __name__ == "__main__":
    main()
