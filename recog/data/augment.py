"""Augmentation for small images (the `small` preset), on one uint8 image C×H×W in a data-loader worker.

torchvision's v2 transforms do the same, but each call costs ~50-200 µs of bookkeeping, which on a 28-pixel
image is far more than the pixels: `Resize + CenterCrop + RandomCrop(padding) + RandomHorizontalFlip` took
~600 µs per image here, these three ~90 µs (PNG decoding itself: ~80 µs). They draw from torch's RNG, which
the stream seeds per batch, so a resumed epoch gets the same images.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


class FitSize:
    """Resize the shorter side to `size` and centre-crop a square; images already size×size pass untouched."""

    def __init__(self, size: int):
        self.size = size
        self.resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image if image.shape[-2:] == (self.size, self.size) else self.resize(image)

    def __repr__(self) -> str:
        return f"FitSize({self.size})"


class RandomShift:
    """Shift by up to `pad` pixels each way, filling with 0: the same as RandomCrop(size, padding=pad)."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.pad == 0:
            return image
        h, w = image.shape[-2:]
        dy, dx = torch.randint(-self.pad, self.pad + 1, (2,)).tolist()
        out = torch.zeros_like(image)
        out[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
            image[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        return out

    def __repr__(self) -> str:
        return f"RandomShift(pad={self.pad})"


class RandomFlip:
    """Mirror left-right with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(-1) if self.p > 0 and torch.rand(()).item() < self.p else image

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"
