"""An export (written by `python -m recog.export`) put to use: images in, embeddings out.

Preprocessing is what model.json says, the same rule as every augment preset's `test` transform: decode as grey
or RGB, resize the shorter side to the image size, crop the centre square. Normalisation is inside the exported
program, so this module hands it uint8 pixels only.

Every file is hostile until read: embedder.pt2 is read into memory once and checked (recog.export.check_pt2:
raw tensors and ATen operators only, nothing pickled) before torch.export.load sees those same bytes; an image
must be a regular file (a FIFO or a device is refused before it is opened for reading), at most `max_bytes`, and
at most `max_pixels` by its header before any pixel is decoded.
"""

from __future__ import annotations

import io
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from recog.data.decode import MAX_SIDE_RATIO, ImageRefused, decode_image, header_size
from recog.errors import ConfigError
from recog.export import FORMAT, MODEL_JSON, check_pt2
from recog.files import plain_name

MAX_IMAGE_MB = 50.0  # the largest image file read (recog.identify --max-mb)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # the largest image decoded, by its header (PIL's decompression-bomb limit)
MAX_PT2_BYTES = 8 << 30  # embedder.pt2 is read whole; recog's models are far smaller
MAX_JSON_BYTES = 64 << 20  # model.json: class names and a few numbers


def read_regular_file(path: str | Path, max_bytes: int, what: str, fix: str) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes`, else one sentence. Opened without
    blocking (a FIFO would wait for a writer) and checked with fstat on that descriptor, so that a device
    (/dev/zero), a FIFO or a folder is refused before a byte is read; at most max_bytes + 1 are ever read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror or e}); {fix}.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, FIFO or socket)"
            raise ConfigError(f"{what} {path} is {kind}; {fix}.")
        if info.st_size > max_bytes:
            raise ConfigError(f"{what} {path} is {info.st_size / 2**20:,.1f} MB, more than the "
                              f"{max_bytes / 2**20:,.1f} MB read; {fix}.")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # a file that grows meanwhile is cut off here, not read on
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror or e}); {fix}.") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ConfigError(f"{what} {path} grew past {max_bytes / 2**20:,.1f} MB while being read; {fix}.")
    return data


def read_model_json(folder: str | Path) -> dict:
    path = Path(folder) / MODEL_JSON
    if not path.exists():
        raise ConfigError(f"no {MODEL_JSON} in {folder}; give a folder written by python -m recog.export.")
    data = read_regular_file(path, MAX_JSON_BYTES, "export description", "export the checkpoint again")
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON ({str(e)[:80]}); export the checkpoint again.") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a recog export's {MODEL_JSON} (format {FORMAT}); give a folder written by "
                          "python -m recog.export.")
    try:  # what readers use, so that a hand-edited model.json is one sentence, not a KeyError
        channels, size = info["input"]["channels"], info["preprocess"]["size"]
        Preprocess.of(info)
        valid = (channels in (1, 3) and type(size) is int and 0 < size <= 4096 and type(info["embedding_dim"]) is int
                 and isinstance(info["checkpoint"]["sha256"], str) and isinstance(info["classes"], list))
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid or not isinstance(info.get("files"), dict):
        raise ConfigError(f"{path} lacks or garbles what a recog export's {MODEL_JSON} says (files, input, "
                          "preprocess, embedding_dim, checkpoint, classes); export the checkpoint again.")
    plain_name(info["files"].get("pt2"), path, "export the checkpoint again")  # never a path to another folder
    return info


@dataclass(frozen=True)
class Preprocess:
    """uint8 C×H×W -> uint8 C×S×S: shorter side resized to S, centre crop (model.json's `preprocess`). A plain
    value, so that data-loader workers can apply it (recog.embed)."""

    size: int
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    @classmethod
    def of(cls, info: dict) -> Preprocess:
        pre = info["preprocess"]
        return cls(pre["size"], InterpolationMode(pre.get("interpolation", "bilinear")))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = TF.resize(image, self.size, interpolation=self.interpolation, antialias=True)
        return TF.center_crop(image, [self.size, self.size])


def load_program(path: Path, folder: str | Path) -> torch.nn.Module:
    """embedder.pt2's program, from bytes that check_pt2 found free of anything that runs code when loaded."""
    fix = f"export the checkpoint again into {folder}"
    if not path.exists():
        raise ConfigError(f"{path} is missing; {fix}.")
    data = read_regular_file(path, MAX_PT2_BYTES, "the exported program", fix)
    check_pt2(data, path)
    try:  # these bytes, not the file again: it could be changed between the check and the load
        return torch.export.load(io.BytesIO(data)).module()
    except Exception as e:  # a damaged or foreign file: torch raises many kinds
        raise ConfigError(f"{path} could not be loaded ({type(e).__name__}); {fix}.") from None


def read_image(path: str | Path, max_bytes: int = int(MAX_IMAGE_MB * 2**20), max_pixels: int = MAX_PIXELS) -> bytes:
    """An image file's bytes, refused in one sentence unless it is a regular file of at most `max_bytes` whose
    header says at most `max_pixels` pixels, sides within MAX_SIDE_RATIO of each other: nothing is decoded yet,
    so a decompression bomb costs its header."""
    data = read_regular_file(path, max_bytes, "image", "give an image file (--max-mb raises the limit)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # an error here, not a line on stderr
            header_size(data, max_pixels)
    except ImageRefused as e:
        if e.why == "not an image":
            raise ConfigError(f"{path} is not an image that can be decoded ({e.cause}); give a PNG, JPEG or WebP "
                              "file.") from None
        if e.why == "too thin":
            raise ConfigError(f"{path} is {e.width}×{e.height} pixels, too thin to resize (its sides differ by more "
                              f"than {MAX_SIDE_RATIO}:1); give a photo of the object.") from None
        size = f"is {e.width}×{e.height} pixels, more" if e.width else "has more pixels"
        raise ConfigError(f"{path} {size} than the {max_pixels:,} decoded (--max-pixels, a decompression-bomb "
                          "limit); give a smaller image.") from None
    return data


class ExportedEmbedder:
    """embedder.pt2 with its model.json: `load_image` -> `preprocess` -> `embed`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.info = read_model_json(folder)
        self.program = load_program(self.folder / self.info["files"]["pt2"], folder)
        self.channels, self._preprocess = self.info["input"]["channels"], Preprocess.of(self.info)
        self.size, self.interpolation = self._preprocess.size, self._preprocess.interpolation

    @property
    def sha256(self) -> str:
        """The checkpoint's sha256: what embeddings and indexes made with this export carry."""
        return self.info["checkpoint"]["sha256"]

    @property
    def dim(self) -> int:
        return self.info["embedding_dim"]

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 C×H×W -> uint8 C×S×S: shorter side resized to S, centre crop."""
        return self._preprocess(image)

    def load_image(self, path: str | Path, max_bytes: int = int(MAX_IMAGE_MB * 2**20),
                   max_pixels: int = MAX_PIXELS) -> torch.Tensor:
        """An image file, decoded and preprocessed; one sentence if it cannot be (see read_image)."""
        return self.decode(read_image(path, max_bytes, max_pixels), path)

    def decode(self, data: bytes, path: str | Path) -> torch.Tensor:
        """The bytes of an image file that read_image accepted -> the program's uint8 C×S×S input."""
        try:
            image = decode_image(data, self.channels)
        except Exception as e:  # PIL raises many kinds on a file that is not an image
            raise ConfigError(f"{path} is not an image that can be decoded ({type(e).__name__}); give a PNG, JPEG "
                              "or WebP file.") from None
        return self.preprocess(image)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """uint8 N×C×S×S -> float32 N×D, unit length."""
        out = [self.program(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)
