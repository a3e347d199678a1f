"""Shard writer: `python -m recog.data write {folder,list,idx,idx-dir} ...` and `python -m recog.data info DIR
[DIR ...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recog.data.manifest import load_manifests
from recog.data.prepare import parse_class_names, write_idx_split
from recog.data.write import folder_records, idx_records, list_records, write_shards
from recog.shell import run_command

CLASS_NAMES_HELP = "'fashion_mnist' or a comma-separated list in label order"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-samples", type=int, default=5000, help="at most this many samples per shard (5000)")
    p.add_argument("--shard-mb", type=float, help="and at most about this many MB per shard")
    # On by default: a folder is read class by class, and shards of one class each would give batches of one or
    # two classes (the stream shuffles within blocks, not across the whole set).
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="shuffle the samples before writing, seeded by --seed (default; --no-shuffle keeps the "
                        "source's order)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards at once")
    p.add_argument("--reencode", choices=["jpg", "png", "webp"], help="re-encode images (default: bytes unchanged)")
    p.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality when re-encoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier write in the output folder (its shards, manifest and index only)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first image that does not decode (default: skip it with a warning)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recog.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write tar shards and manifest.json")
    sources = write.add_subparsers(dest="source", required=True)

    folder = sources.add_parser("folder", help="a folder with one sub-folder of images per class")
    folder.add_argument("src")
    folder.add_argument("out")
    _common(folder)
    folder.set_defaults(run=write_source)

    listing = sources.add_parser("list", help="a text file of `path<TAB>label` lines")
    listing.add_argument("list_file")
    listing.add_argument("out")
    _common(listing)
    listing.set_defaults(run=write_source)

    idx = sources.add_parser("idx", help="an MNIST-format image file and its label file")
    idx.add_argument("images")
    idx.add_argument("labels")
    idx.add_argument("out")
    idx.add_argument("--class-names", help=CLASS_NAMES_HELP)
    _common(idx)
    idx.set_defaults(run=write_source)

    idx_dir = sources.add_parser("idx-dir", help="an MNIST-style folder: writes OUT/train and OUT/test")
    idx_dir.add_argument("src")
    idx_dir.add_argument("out")
    idx_dir.add_argument("--class-names", help=CLASS_NAMES_HELP)
    idx_dir.add_argument("--shard-samples", type=int, default=5000)
    idx_dir.set_defaults(run=write_idx_dir)

    info = commands.add_parser("info", help="summarise a folder of shards, or the union of several")
    info.add_argument("folders", nargs="+", help="folders of shards; several: their classes united by name, as "
                                                 "data.train=[A,B] unites them")
    info.set_defaults(run=show_info)
    return parser


def show_info(args: argparse.Namespace) -> None:
    m = load_manifests(args.folders)
    if len(args.folders) > 1:
        for part in m.parts():
            own = part.manifest
            print(f"{part.location}: {own.num_samples} samples in {len(own.shards)} shards, {own.num_classes} classes")
        print("together:", end=" ")
    print(f"{m.num_samples} samples in {len(m.shards)} shards, {m.num_classes} classes")
    for name, count in zip(m.classes, m.class_counts):
        print(f"  {count:>8}  {name}")


def write_idx_dir(args: argparse.Namespace) -> None:
    for split in ("train", "test"):
        m = write_idx_split(args.src, split, Path(args.out) / split, args.class_names, args.shard_samples)
        print(f"{split}: {m.num_samples} samples in {len(m.shards)} shards -> {Path(args.out) / split}")


def write_source(args: argparse.Namespace) -> None:
    if args.source == "folder":
        records, classes = folder_records(args.src)
        sources = [args.src]
    elif args.source == "list":
        records, classes = list_records(args.list_file)
        sources = [args.list_file]  # and the listed images, which the records name
    else:
        records, classes = idx_records(args.images, args.labels, parse_class_names(args.class_names))
        sources = [args.images, args.labels]
    m = write_shards(records, classes, args.out, prefix=args.prefix, shard_samples=args.shard_samples,
                     shard_mb=args.shard_mb, shuffle=args.shuffle, seed=args.seed, overwrite=args.overwrite,
                     sources=sources, strict=args.strict, workers=args.workers, reencode_to=args.reencode,
                     quality=args.quality)
    print(f"{m.num_samples} samples in {len(m.shards)} shards, {m.num_classes} classes -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
