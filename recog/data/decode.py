"""Encoded image bytes -> uint8 tensors, in the data-loader workers."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor C×H×W. Raises on damaged data."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft(mode, None)  # decode straight into the wanted mode
        if image.mode != mode:
            image = image.convert(mode)
        pixels = torch.from_numpy(np.array(image))  # decodes (raises on damaged data) into a writable array
    return pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1)


def decode_sample(sample: dict, channels: int) -> tuple[torch.Tensor, int]:
    """Raw sample dict -> (uint8 image tensor C×H×W, class index). Raises on anything undecodable."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"no image ({'/'.join(IMAGE_KEYS)}) in sample {sample.get('__key__')}")
    return decode_image(sample[key], channels), int(sample["cls"])
