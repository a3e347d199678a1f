"""Shared fixtures: tiny real shards cut from the bundled Fashion-MNIST subset, and a way to run train.py."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recog.data.idx import find_idx_pair
from recog.data.write import FASHION_MNIST_CLASSES, idx_records, write_shards

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "fashion-mnist-subset"


def tiny_split(out: Path, split: str, count: int, shard_samples: int):
    records, classes = idx_records(*find_idx_pair(BUNDLED, split), FASHION_MNIST_CLASSES)
    return write_shards(records[:count], classes, out, prefix=split, shard_samples=shard_samples, progress=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """1,000 training images in shards of 384, 384, 232 and 301 test images (both uneven on purpose)."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_split(root / "train", "train", 1000, 384)
    tiny_split(root / "test", "test", 301, 128)
    return {"train": root / "train", "test": root / "test"}


# A traceback frame of recog's own code (its package or train.py), wherever the checkout lies: a checkout named
# `recog` puts that word in the paths of its .venv's packages (torchrun's own report) too.
RECOG_FRAME = re.compile(r'File "[^"]*/(?:recog/(?:\w+/)*\w+|train)\.py"')


def recog_frames(stderr: str) -> list[str]:
    """The lines of `stderr` that are frames of recog's code: none where recog printed one sentence."""
    return [line for line in stderr.splitlines() if RECOG_FRAME.search(line) and "site-packages" not in line]


def train_cmd(nproc: int | None) -> list[str]:
    if nproc is None:
        return [sys.executable, str(ROOT / "train.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "train.py")]


def run_train(args: list[str], cwd: Path, nproc: int | None = 2, timeout: float = 300, extra_env=None):
    """Run train.py for real (under torchrun when nproc is given); return the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run(train_cmd(nproc) + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tiny_args(tiny_data, **overrides) -> list[str]:
    args = {
        "data.train": str(tiny_data["train"]), "data.test": str(tiny_data["test"]), "data.prepare": "null",
        "epochs": 1, "batch_size": 32, "log_every": 5,
        "data.num_workers": 1,  # fixed, not auto: runs compared across layouts (hosts, ranks) read the same plan
        "model.width": 16,  # half the default's width: a quarter of its compute, plenty for these checks
    }
    args.update(overrides)
    return [f"{k}={v}" for k, v in args.items() if v is not None]  # None: leave that key out


@pytest.fixture(autouse=True)
def root_logging_put_back():
    """recog's entry points set up the root logger in-process (recog.log.setup_logging: a handler on the sys.stdout
    of the moment). Under capsys that stream is closed when the test ends, and a later test's warning written to it
    was a "Logging error" traceback on stderr: each test's root handlers and level are put back after it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny batches: one thread is faster than several contending ones (and many times so on a busy machine).
    A test module asks for it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """A busy 2-core machine: faiss's OpenMP threads spinning against other processes are many times slower.
    A test module asks for it with `pytestmark = pytest.mark.usefixtures("one_faiss_thread")`."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
