"""Training crops of JPEGs: full decoding, then RandomResizedCrop + flip (data.jpeg_scaled_decode=false), against
the crop taken while decoding at reduced size (the default), side by side.

    python bench/decode.py                   # 500x375, 1000x750 and 2000x1500 photo-like JPEGs, q90, 5 rounds
    python bench/decode.py --size 112 --rounds 3

With scikit-learn installed (the bench extra) also its two photos (640x427), 50 times each: at --size 224 no
crop of them allows a reduction, at 112 most do.

One process, one thread: the figures are images/s per core of what a data-loader worker does per image
(decode, crop, resize, flip). Each round runs every case once per set, in rotating order; the table reports
medians (the speed-up: the median of each round's ratio). The same crops are drawn in every case (torch's
RNG seeded alike). The middle case decodes every JPEG at full size with libjpeg-turbo (simplejpeg) instead of
PIL, reducing none: it splits the gain into the decoder's and the reduction's. Last, the pixel difference
from full decoding: mean absolute, in levels of 255.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import statistics

import numpy as np
import simplejpeg
import torch
from _common import header, medians, rounds, row, timed
from torchvision.transforms import v2

from recog.data.decode import CropWhileDecoding, crop_while_decoding, decode_image
from recog.testing import photo_like_jpeg

SETS = {"500x375": (500, 375, 200), "1000x750": (1000, 750, 100), "2000x1500": (2000, 1500, 40)}  # w, h, images


class FullSizeTurbo(CropWhileDecoding):
    """CropWhileDecoding that never reduces: libjpeg-turbo at full size, then the crop as torchvision takes it."""

    def plan(self, box: dict):
        return 1, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="RandomResizedCrop's output size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=float, default=1.0, help="a multiple of each set's number of images")
    args = parser.parse_args()
    torch.set_num_threads(1)

    augment = v2.Compose([v2.RandomResizedCrop(args.size, antialias=True), v2.RandomHorizontalFlip()])
    scaled, rest = crop_while_decoding(augment)
    turbo = FullSizeTurbo(augment.transforms[0])
    pipelines = {
        "full (PIL)": lambda data: augment(decode_image(data, 3)),
        "full (turbo)": lambda data: rest(turbo(data, 3)),
        "scaled": lambda data: rest(scaled(data, 3)),
    }
    rng = np.random.default_rng(0)
    sets = {}
    for name, (width, height, count) in SETS.items():
        sets[name] = [photo_like_jpeg(rng, width, height) for _ in range(max(1, round(count * args.images)))]
    if importlib.util.find_spec("sklearn"):  # two real photos (640x427) that scikit-learn ships, each 50 times
        images = importlib.resources.files("sklearn.datasets") / "images"
        sets["photos"] = [(images / f"{n}.jpg").read_bytes() for n in ("china", "flower")] * round(50 * args.images)
    for name, jpegs in sets.items():
        print(f"{name}: {len(jpegs)} JPEGs, mean {statistics.mean(map(len, jpegs)) / 1e3:.0f} KB", flush=True)

    def run(pipeline, jpegs):
        for i, data in enumerate(jpegs):
            torch.manual_seed(i)  # the same crop and flip for image i in every case
            pipeline(data)
        return len(jpegs)

    def images_per_s(pipeline, jpegs):
        def case(_round):
            count, seconds = timed(run, pipeline, jpegs)
            return count / seconds
        return case

    cases = {(s, p): images_per_s(pipelines[p], sets[s]) for s in sets for p in pipelines}
    rates = rounds({f"{s} {p}": fn for (s, p), fn in cases.items()}, args.rounds, progress=True)
    med = medians(rates)

    columns = [("JPEGs", "<10"), ("full (PIL)", ">11.0f"), ("full (turbo)", ">13.0f"), ("scaled", ">8.0f"),
               ("speed-up", ">9.2f"), ("reduced", ">8.0%"), ("diff all", ">9.2f"), ("diff reduced", ">13s")]
    print(f"\nimages/s per core (median of {args.rounds} rounds), RandomResizedCrop({args.size}) + flip; "
          "diff: mean absolute difference from full decoding, levels of 255")
    print(header(columns))
    for name, jpegs in sets.items():
        differences, reduced = [], []
        for i, data in enumerate(jpegs):
            torch.manual_seed(i)
            expected = augment(decode_image(data, 3))
            torch.manual_seed(i)
            got = pipelines["scaled"](data)
            differences.append((got.float() - expected.float()).abs().mean().item())
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            torch.manual_seed(i)  # the crop drawn for image i: was it decoded reduced?
            box = augment.transforms[0].make_params([torch.empty(1, 1, 1).expand(1, height, width)])
            reduced.append(scaled.plan(box)[0] > 1)
        on_reduced = [d for d, r in zip(differences, reduced, strict=True) if r]
        # the speed-up of each round (its two cases ran minutes apart at most), then the median of those
        speedup = statistics.median(a / b for a, b in zip(rates[f"{name} scaled"], rates[f"{name} full (PIL)"],
                                                         strict=True))
        print(row(columns, [name, med[f"{name} full (PIL)"], med[f"{name} full (turbo)"], med[f"{name} scaled"],
                            speedup, np.mean(reduced),
                            np.mean(differences), f"{np.mean(on_reduced):.2f} (max {max(on_reduced):.2f})"
                            if on_reduced else "-"]))
    print("\nrounds (images/s):")
    for name, values in rates.items():
        print(f"  {name:<24} " + " ".join(f"{v:.0f}" for v in values))


if __name__ == "__main__":
    main()
