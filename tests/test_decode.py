"""decode_image is the one place that decides an image's pixels: 16-bit images keep their high byte, and an EXIF
orientation turns the image upright, on every decoding path (PIL, TorchCodec's PNGs, the crop while decoding,
data.decode=gpu, the shard writer)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from recog.data.decode import CropWhileDecoding, decode_image, jpeg_orientation, plain_png
from recog.data.gpu_decode import GPU_DECODE_AVAILABLE, decode_batch
from recog.data.write import check_image, reencode

T = Image.Transpose
# The turn that stores an upright image so that orientation o shows it upright again (the inverse of ImageOps')
STORED = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
          7: T.TRANSVERSE, 8: T.ROTATE_270}


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 values, H×W (grey) or H×W×3 (RGB), written by hand (PIL writes 16-bit grey only)."""
    height, width = values.shape[:2]
    colour = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def sixteen_bit_values(colour: bool) -> np.ndarray:
    grid = np.linspace(0, 65535, 8 * 12).round().astype(np.uint16).reshape(8, 12)
    return np.stack([grid, 65535 - grid, np.full_like(grid, 3000)], -1) if colour else grid


@pytest.mark.parametrize("stored", ["grey I;16 (PIL)", "grey 16-bit", "RGB 16-bit"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_keep_their_high_byte(stored, channels):
    values = sixteen_bit_values(colour=stored.startswith("RGB"))
    if stored == "grey I;16 (PIL)":
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, format="PNG")
        data = buffer.getvalue()
        assert Image.open(io.BytesIO(data)).mode == "I;16"
    else:
        data = png16(values)
    eight = (values >> 8).astype(np.float64)  # the rule (docs/data.md): v >> 8, within a level of v / 257
    if values.ndim == 2:
        eight = np.repeat(eight[None], channels, 0)
    else:
        eight = eight.transpose(2, 0, 1)
        if channels == 1:  # PIL's grey of RGB (ITU-R 601-2 luma), from the 8-bit channels
            eight = (eight * np.array([299, 587, 114])[:, None, None]).sum(0, keepdims=True) / 1000
    pixels = decode_image(data, channels)
    assert pixels.shape == (channels, 8, 12) and pixels.dtype == torch.uint8
    assert np.abs(pixels.numpy() - eight).max() <= 1
    if values.ndim == 2:  # and within a level of v / 257, the other common rule
        assert np.abs(pixels.numpy() - values / 257).max() <= 1


def test_the_writer_measures_and_reencodes_a_16_bit_image_as_decoded():
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 5), 3000, np.uint16)).save(buffer, format="PNG")
    grey, height, width, sums, _, count = check_image(buffer.getvalue(), measure=True)
    assert grey and (height, width, count) == (6, 5, 30)
    assert np.allclose(sums / count, 11 / 255)  # 3000 >> 8; it was 255 / 255: white
    again = np.asarray(Image.open(io.BytesIO(reencode(buffer.getvalue(), "png", 90))))
    assert (again == 11).all()


def upright_image(mode: str) -> Image.Image:
    """16×32 (W×H) and smooth (JPEG keeps it well), no two pixels alike along a row or a column."""
    y, x = np.mgrid[0:32, 0:16]
    grey = (40 + 5 * x + 6 * y).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(grey)
    return Image.fromarray(np.stack([grey, (200 - 4 * y).astype(np.uint8), (30 + 9 * x).astype(np.uint8)], -1))


def stored_with(orientation: int, image: Image.Image, fmt: str) -> bytes:
    """`image` stored turned, with the EXIF orientation that turns it back."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    turned = image.transpose(STORED[orientation]) if STORED[orientation] is not None else image
    buffer = io.BytesIO()
    turned.save(buffer, format=fmt, exif=exif, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def chunks(png: bytes) -> list[bytes]:
    found, position = [], 8
    while position < len(png):
        end = position + 12 + int.from_bytes(png[position:position + 4], "big")
        found.append(png[position:end])
        position = end
    return found


def exif_after_the_pixels(png: bytes) -> bytes:
    """The same PNG with its eXIf chunk moved after the image data (libpng and PIL read it there too)."""
    parts = chunks(png)
    exif = next(c for c in parts if c[4:8] == b"eXIf")
    rest = [c for c in parts if c is not exif]
    return png[:8] + b"".join(rest[:-1]) + exif + rest[-1]


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("exif", ["before the pixels", "after the pixels"])
def test_every_exif_orientation_of_a_png_decodes_as_the_upright_image(orientation, mode, exif):
    upright = upright_image(mode)
    data = stored_with(orientation, upright, "PNG")
    if exif == "after the pixels":
        data = exif_after_the_pixels(data)
        assert [c[4:8] for c in chunks(data)][-2:] == [b"eXIf", b"IEND"]
    assert not plain_png(data, 1 if mode == "L" else 3)  # an eXIf chunk keeps it off TorchCodec's fast path
    expected = torch.from_numpy(np.array(upright))
    expected = expected[None] if mode == "L" else expected.permute(2, 0, 1)
    for channels in ([1, 3] if mode == "L" else [3]):
        assert torch.equal(decode_image(data, channels), expected.expand(channels, -1, -1))
    assert decode_image(data, None).shape == (1 if mode == "L" else 3, 32, 16)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_of_a_jpeg_decodes_upright_on_every_path(orientation):
    upright = upright_image("RGB")
    data = stored_with(orientation, upright, "JPEG")
    assert jpeg_orientation(data) == orientation
    reference = torch.from_numpy(np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))).permute(2, 0, 1)
    pixels = decode_image(data, 3)
    assert torch.equal(pixels, reference)  # PIL's own turn, to the bit
    assert (pixels.float() - torch.from_numpy(np.array(upright)).permute(2, 0, 1)).abs().mean() < 1.5

    # The crop while decoding: simplejpeg ignores EXIF, so an oriented JPEG takes the full decode; same draws
    crop = v2.RandomResizedCrop(12, antialias=True)
    torch.manual_seed(orientation)
    expected = crop(decode_image(data, 3))
    torch.manual_seed(orientation)
    assert torch.equal(CropWhileDecoding(crop)(data, 3), expected)

    # data.decode=gpu (on a CPU device here; on the GPU too where there is one: bench/gpu_session.sh part 6): a
    # turned JPEG is decoded by decode_image, not by the device's decoder
    if GPU_DECODE_AVAILABLE:
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8)]
        for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():
            images, _, failed = decode_batch(encoded, torch.tensor([0]), device, None, 3)
            assert not failed and torch.equal(images[0].cpu(), pixels)

    # the writer measures it upright
    _, height, width, *_ = check_image(data, measure=True)
    assert (height, width) == (32, 16)


def test_the_exif_guard_keeps_jpegs_without_exif_on_the_fast_path():
    from recog.testing import photo_like_jpeg

    plain = photo_like_jpeg(np.random.default_rng(0), 500, 375)
    assert jpeg_orientation(plain) == 1 and b"Exif" not in plain[:4096]
    with_exif = stored_with(1, Image.open(io.BytesIO(plain)), "JPEG")
    assert jpeg_orientation(with_exif) == 1
    assert jpeg_orientation(b"\xff\xd8\xff\xe1\x00\x08Exif\x00\x00garbage") == 1  # a damaged EXIF: as stored
    start = time.perf_counter()
    for _ in range(1000):
        jpeg_orientation(plain)
    assert time.perf_counter() - start < 0.5  # a few µs each (docs/data.md gives the measured cost)
