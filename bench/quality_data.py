"""Real small image sets written out as class folders, the way a user's own data looks.

    .venv/bin/python bench/quality_data.py OUT                  # every set whose source is on this machine
    .venv/bin/python bench/quality_data.py OUT fashion-small digits

writes OUT/NAME/train/<class>/<i>.png and OUT/NAME/test/<class>/<i>.png (8-bit grey PNGs). Nothing is
downloaded; each set comes from files already here, and the same sources always give the same bytes:

| set           | train / test, size    | source                                                  | licence       |
|---------------|-----------------------|---------------------------------------------------------|---------------|
| fashion-small | 10,000 / 2,000, 28x28 | data/fashion-mnist-subset, bundled with recog           | MIT (Zalando) |
| fashion-8k    | 8,000 / 2,000, 28x28  | Debian's dataset-fashion-mnist (full Fashion-MNIST):    | MIT (Zalando) |
|               |                       | its last 8,000 train and 2,000 test images, disjoint    |               |
|               |                       | from fashion-small (the first 10,000 / 2,000)           |               |
| digits        | 1,437 / 360, 8x8      | scikit-learn's bundled load_digits (UCI optical digits) | CC BY 4.0     |
|               |                       | split 80/20, stratified, seed 0                         |               |

Debian has no other image data set package (no MNIST digits, no CIFAR); no RGB set is obtainable here.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: recog is imported from this checkout

from recog.data.idx import find_idx_pair, read_idx  # noqa: E402  (after the sys.path line)
from recog.data.write import FASHION_MNIST_CLASSES  # noqa: E402

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

# One split: (images uint8 (N, H, W), labels int (N,)); a set: (train, test, class names in label order).
Split = tuple[np.ndarray, np.ndarray]


def _fashion_idx(folder: Path, split: str) -> Split:
    images, labels = find_idx_pair(folder, split)
    return read_idx(images), read_idx(labels)


def fashion_small():
    folder = ROOT / "data" / "fashion-mnist-subset"
    return _fashion_idx(folder, "train"), _fashion_idx(folder, "test"), FASHION_MNIST_CLASSES


def fashion_8k():
    # The bundled subset is the first 10,000 / 2,000 of the official files; the tail is new images.
    (x, y), (xt, yt) = _fashion_idx(DEBIAN_FASHION, "train"), _fashion_idx(DEBIAN_FASHION, "test")
    return (x[-8000:], y[-8000:]), (xt[-2000:], yt[-2000:]), FASHION_MNIST_CLASSES


def digits():
    from sklearn.datasets import load_digits  # ships inside the scikit-learn wheel: no download
    from sklearn.model_selection import train_test_split

    data = load_digits()
    # Pixel values are counts 0..16 of a 4x4 block; stretch them to 8-bit grey.
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    x, xt, y, yt = train_test_split(images, data.target, test_size=0.2, stratify=data.target, random_state=0)
    return (x, y), (xt, yt), [str(d) for d in range(10)]


SETS = {"fashion-small": fashion_small, "fashion-8k": fashion_8k, "digits": digits}


def available() -> list[str]:
    """The sets whose sources are on this machine."""
    names = ["fashion-small"]
    names += ["fashion-8k"] if DEBIAN_FASHION.is_dir() else []
    names += ["digits"] if importlib.util.find_spec("sklearn") else []
    return names


def _missing_hint(name: str) -> str:
    return {"fashion-8k": "apt-get install dataset-fashion-mnist",
            "digits": ".venv/bin/pip install scikit-learn"}.get(name, "check the recog checkout")


def write_set(name: str, out: str | Path) -> Path:
    """Write set `name` under out/name (once: an earlier complete write is kept) and return that folder."""
    if name not in SETS:
        raise SystemExit(f"unknown set {name!r}; choose from {', '.join(SETS)}.")
    if name not in available():
        raise SystemExit(f"set {name!r} needs its source on this machine: {_missing_hint(name)}.")
    target = Path(out) / name
    if (target / ".complete").is_file():
        return target
    # Written into a temporary folder and renamed, so an interrupted write is never taken for a set.
    tmp = Path(out) / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    train, test, classes = SETS[name]()
    # A class name is a folder name: "T-shirt/top" would be two folders.
    folders = [c.replace("/", "-") for c in classes]
    for split, (images, labels) in (("train", train), ("test", test)):
        for folder in folders:
            (tmp / split / folder).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(np.ascontiguousarray(image)).save(tmp / split / folders[int(label)] / f"{i:05d}.png")
    (tmp / ".complete").write_text(f"{len(train[1])} train, {len(test[1])} test, {len(classes)} classes\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    out, names = argv[0], argv[1:] or available()
    for name in names:
        target = write_set(name, out)
        print(f"{name}: {(target / '.complete').read_text().strip()} -> {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
