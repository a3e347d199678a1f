"""Identify images: their nearest gallery items and a class vote.

    python -m recog.identify --model EXPORT_DIR --index INDEX_DIR [-k 5] [--json] [--max-mb 50] IMAGE...

Each image is decoded, resized and cropped as the export's model.json says, embedded, and searched in the index
(built with python -m recog.index from embeddings of the same export). The vote weighs each of the k matches'
labels by its score (cosine similarity), so one very close match outweighs two distant ones of another class;
it is the label with the largest sum, named by the gallery's class names. `--json` prints one list with one
object per image: {"image": path, "vote": class name, "matches": [{"key", "label", "class", "score"}, ...]}
(label: the gallery item's class index, class: its name).

Every image is read before the export is loaded, and refused in one sentence (exit code 2) unless it is a regular
file (not a FIFO, a device or a folder) of at most --max-mb whose header says at most --max-pixels pixels; the
export is refused if its embedder.pt2 holds anything that could run code when loaded (recog.exported.check_pt2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch
from PIL import Image

from recog.errors import ConfigError
from recog.exported import MAX_IMAGE_MB, MAX_PIXELS, ExportedEmbedder, read_image
from recog.gallery import Gallery, open_gallery
from recog.shell import run_command


def check_match(embedder: ExportedEmbedder, gallery: Gallery, model_dir: str, index_dir: str) -> None:
    """Vectors of different models are not comparable, even at the same width: refuse the pair."""
    if embedder.dim != gallery.info.dim:
        raise ConfigError(f"the export in {model_dir} gives {embedder.dim}-d embeddings and the index in {index_dir} "
                          f"holds {gallery.info.dim}-d ones; give the export the index was built with.")
    if embedder.sha256 != gallery.info.model_sha256:
        raise ConfigError(f"the index in {index_dir} was built from another model's embeddings (checkpoint sha256 "
                          f"{gallery.info.model_sha256[:12]}, the export in {model_dir} is "
                          f"{embedder.sha256[:12]}); give the export the index was built with, or embed the "
                          "gallery again with this one.")


def vote(labels: list[int], scores: list[float]) -> int | None:
    """The label with the largest summed score (ties: the one of the best match); None without matches."""
    totals: dict[int, float] = defaultdict(float)
    for label, score in zip(labels, scores):
        totals[label] += score
    return max(totals, key=lambda label: (totals[label], -labels.index(label))) if totals else None


def class_name(label: int | None, classes: list[str]) -> str | None:
    if label is None:
        return None
    return classes[label] if 0 <= label < len(classes) else str(label)


def identify(model_dir: str, index_dir: str, images: list[str], k: int = 5, max_mb: float = MAX_IMAGE_MB,
             max_pixels: int = MAX_PIXELS) -> list[dict]:
    """One result per image, in order: {"image", "vote", "matches": [{"key", "label", "class", "score"}, ...]}."""
    if k < 1:
        raise ConfigError(f"-k {k} asks for no match; give -k 1 or more.")
    if not (0 < max_mb < 1e6 and max_pixels > 0):  # not nan, not inf
        raise ConfigError(f"--max-mb {max_mb} and --max-pixels {max_pixels} are not sizes; give numbers above 0.")
    max_bytes = int(max_mb * 2**20)
    for path in images:  # each checked before the export is loaded (a bad one costs no model load), then let go
        read_image(path, max_bytes, max_pixels)
    embedder, gallery = ExportedEmbedder(model_dir), open_gallery(index_dir)
    check_match(embedder, gallery, model_dir, index_dir)
    # read again (and checked again: a file may change), one at a time: only the preprocessed pixels are kept
    pixels = torch.stack([embedder.load_image(path, max_bytes, max_pixels) for path in images])
    # faiss sets aside k results per query: more than the gallery holds would only be padding
    scores, ids = gallery.search(embedder.embed(pixels), min(k, max(1, len(gallery.keys))))
    classes = gallery_class_names(embedder, gallery)
    return [{"image": path, **answer(gallery, classes, row_scores, row_ids)}
            for path, row_scores, row_ids in zip(images, scores, ids)]


def gallery_class_names(embedder: ExportedEmbedder, gallery: Gallery) -> list[str]:
    return gallery.info.classes or embedder.classes  # the gallery's labels: its own names first


def answer(gallery: Gallery, classes: list[str], scores, ids) -> dict:
    """One query's search result (a row of scores and ids) as {"vote", "matches": [{"key", "label", "class",
    "score"}, ...]}: what recog.identify --json and recog.serve's POST /identify both answer."""
    found = ids >= 0  # faiss pads with -1 when the gallery holds fewer than k items
    labels = [int(x) for x in gallery.labels[ids[found]]]
    matches = [{"key": str(gallery.keys[i]), "label": label, "class": class_name(label, classes),
                "score": round(float(s), 6)} for i, label, s in zip(ids[found], labels, scores[found])]
    return {"vote": class_name(vote(labels, list(scores[found])), classes), "matches": matches}


def print_table(results: list[dict]) -> None:
    for result in results:
        print(f"{result['image']}: {result['vote']}")
        for rank, m in enumerate(result["matches"], 1):
            print(f"  {rank:>3}. {m['score']:.4f}  {m['class']}  {m['key']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recog.identify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a folder written by python -m recog.export")
    parser.add_argument("--index", required=True, help="a folder written by python -m recog.index build")
    parser.add_argument("-k", type=int, default=5, help="matches per image, and the votes (5)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--max-mb", type=float, default=MAX_IMAGE_MB,
                        help=f"largest image file read, in MB ({MAX_IMAGE_MB:g})")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"largest image decoded, in pixels by its header ({MAX_PIXELS:,})")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    args = parser.parse_args(argv)
    if Image.MAX_IMAGE_PIXELS is not None:  # PIL's own bomb check, where --max-pixels goes beyond it
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, args.max_pixels)
    return run_command(lambda: identify_and_say(args))


def identify_and_say(args: argparse.Namespace) -> None:
    results = identify(args.model, args.index, args.images, args.k, args.max_mb, args.max_pixels)
    try:
        if args.json:
            print(json.dumps(results, indent=1))
        else:
            print_table(results)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is silent


if __name__ == "__main__":
    sys.exit(main())
