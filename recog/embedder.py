"""An export (written by `python -m recog.export`) put to use: images in, embeddings out.

Preprocessing is what model.json says, the same rule as every augment preset's `test` transform: decode as grey
or RGB, resize the shorter side to the image size, crop the centre square. Normalisation is inside the exported
program, so this module hands it uint8 pixels only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from recog.data.decode import decode_image
from recog.errors import ConfigError
from recog.export import FORMAT, MODEL_JSON


def read_model_json(folder: str | Path) -> dict:
    path = Path(folder) / MODEL_JSON
    if not path.is_file():
        raise ConfigError(f"no {MODEL_JSON} in {folder}; give a folder written by python -m recog.export.")
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); export the checkpoint again.") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a recog export's {MODEL_JSON} (format {FORMAT}); give a folder written by "
                          "python -m recog.export.")
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


class ExportedEmbedder:
    """embedder.pt2 with its model.json: `load_image` -> `preprocess` -> `embed`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.info = read_model_json(folder)
        path = self.folder / self.info["files"]["pt2"]
        if not path.is_file():
            raise ConfigError(f"{path} is missing; export the checkpoint again into {folder}.")
        try:
            self.program = torch.export.load(path).module()
        except Exception as e:  # a damaged or foreign file: torch raises many kinds
            raise ConfigError(f"{path} could not be loaded ({type(e).__name__}); export the checkpoint again "
                              f"into {folder}.") from None
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

    def load_image(self, path: str | Path) -> torch.Tensor:
        """An image file, decoded and preprocessed; one sentence if it cannot be."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"image {path} cannot be read ({e.strerror or e}); check the path.") from None
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
