"""What the export, index and identify tests make: checkpoints of the real configs, real test images, and
embeddings folders of synthetic clustered vectors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import BUNDLED, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recog.checkpoint import save_checkpoint
from recog.data.idx import find_idx_pair
from recog.data.write import FASHION_MNIST_CLASSES, idx_records
from recog.embeddings import part_name, write_manifest, write_part
from recog.model import RecognitionModel
from recog.rundir import register_resolvers

# what the bundled Fashion-MNIST subset's manifest says (train.py settles data.*=auto to these)
FASHION_DATA = ["data.channels=1", "data.image_size=28", "data.mean=[0.2853]", "data.std=[0.3541]"]


def config(*overrides: str) -> dict:
    """The real train config, composed and resolved as train.py saves it into its checkpoints."""
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*FASHION_DATA, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def random_checkpoint(path: Path, *overrides: str, seed: int = 0) -> RecognitionModel:
    """A model with random weights (and BatchNorm statistics, so eval mode is not the identity), saved with the
    two entries of a training checkpoint that export reads: the state dict and the resolved config."""
    cfg = config(*overrides)
    torch.manual_seed(seed)
    spec = {k: v for k, v in cfg["model"].items() if k != "_target_"}
    model = RecognitionModel(num_classes=10, in_channels=cfg["data"]["channels"], **spec)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
    save_checkpoint({"model": model.state_dict(), "config": cfg, "epoch": 1, "step": 1}, path)
    return model.eval()


def fashion_test_images(folder: Path, count: int) -> list[tuple[Path, int]]:
    """The first `count` images of the bundled Fashion-MNIST test set as PNG files, with their labels."""
    records, _ = idx_records(*find_idx_pair(BUNDLED, "test"), FASHION_MNIST_CLASSES)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, record in enumerate(records[:count]):
        path = folder / f"test-{i:04d}.png"
        path.write_bytes(record.read())
        out.append((path, record.label))
    return out


def clustered(count: int, dim: int = 128, clusters: int = 100, rank: int = 8, seed: int = 0) -> np.ndarray:
    """Unit vectors near `clusters` centres, each cluster spread over its own `rank`-dimensional subspace: like
    a trained model's embeddings (classes, low intrinsic dimension), unlike isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    bases = rng.standard_normal((clusters, rank, dim)).astype(np.float32) * (0.7 / np.sqrt(rank))
    which = rng.integers(0, clusters, count)
    x = centres[which] + np.einsum("kr,krd->kd", rng.standard_normal((count, rank)).astype(np.float32),
                                   bases[which])
    x += 0.02 * rng.standard_normal((count, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(folder: Path, vectors: np.ndarray, part_size: int, sha256: str = "a" * 64,
                     first_key: int = 0, classes: int = 10, dtype: str = "float32", labels=None) -> Path:
    """An embeddings folder of `vectors` (stored as `dtype`), keys 'k<id>' and `labels` (default id % `classes`)."""
    parts = []
    for number, start in enumerate(range(0, len(vectors), part_size)):
        ids = np.arange(start, min(start + part_size, len(vectors))) + first_key
        mine = ids % classes if labels is None else np.asarray(labels)[start : start + part_size]
        parts.append(write_part(folder, part_name(number), vectors[start : start + part_size].astype(dtype),
                                [f"k{i}" for i in ids], mine))
    write_manifest(folder, sha256, vectors.shape[1], dtype, parts, [f"class{i}" for i in range(classes)])
    return folder


def run_module(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m recog.<module> ...` as a user runs it, with this checkout's recog first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"recog.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
