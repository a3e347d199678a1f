"""Logging and TensorBoard: rank 0 writes, every other rank gets stand-ins that do nothing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def setup_logging(run_dir: Path | None, is_main: bool) -> logging.Logger:
    """Rank 0: INFO to the console and to run_dir/train.log. Other ranks: warnings and errors only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    if is_main and run_dir is not None:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(fmt)
        root.addHandler(file)
    return logging.getLogger("recog")


class NullWriter:
    """SummaryWriter's interface, doing nothing: what ranks other than 0 log to."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def make_writer(run_dir: Path, is_main: bool, purge_step: int | None = None):
    """purge_step: when a run resumes in its own directory, events the interrupted run logged at this
    step or later are hidden, so the curves do not show those steps twice."""
    return SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step) if is_main else NullWriter()
