"""Logging, TensorBoard and MLflow: rank 0 writes, every other rank gets stand-ins that do nothing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from recog.files import write_json

if TYPE_CHECKING:
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


class Writer:
    """What the training loop logs to on rank 0: TensorBoard, and with logger=mlflow an MLflow run beside it
    (recog/mlflow_log.py). Scalars go to both; images, embeddings and hparams are TensorBoard's; the run's files
    (metrics.json, model.json) are MLflow's artefacts."""

    def __init__(self, tensorboard: SummaryWriter, mlflow=None):
        self.tensorboard, self.mlflow = tensorboard, mlflow

    def add_scalar(self, tag: str, value, step: int) -> None:
        self.tensorboard.add_scalar(tag, value, step)
        if self.mlflow is not None:
            self.mlflow.add_scalar(tag, value, step)

    def log_artifacts(self, paths: list[Path]) -> None:
        if self.mlflow is not None:
            self.mlflow.log_artifacts(paths)

    def close(self) -> None:
        self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.close()

    def __getattr__(self, name):  # add_image, add_embedding, add_hparams, flush: TensorBoard's
        return getattr(self.tensorboard, name)


def make_writer(run_dir: Path, is_main: bool, resumed_at: int | None = None, logger=None, config: dict | None = None):
    """resumed_at: the step a run resumed in its own directory continues from. TensorBoard hides what the
    interrupted run logged after it, so the curves do not show those steps twice (its events of that step came
    before the checkpoint, and stay). `logger`: the logger config (conf/logger/; name mlflow: an MLflow run too,
    its params the resolved `config`)."""
    if not is_main:
        return NullWriter()
    mlflow = None
    if logger is not None and logger.name == "mlflow":
        from recog.mlflow_log import MlflowLog

        mlflow = MlflowLog(logger, run_dir, config or {})
    purge_step = resumed_at + 1 if resumed_at is not None else None
    # Imported here: only rank 0 writes TensorBoard. The import (tensorboard, and through its file layer boto3,
    # botocore, urllib3, cryptography) is ~0.6 s of CPU that a rank with a NullWriter no longer spends.
    from torch.utils.tensorboard import SummaryWriter

    return Writer(SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step), mlflow)


def write_model_json(run_dir: Path, backbone: str, model, classes: list[str], top1: float, best_top1: float) -> Path:
    """run_dir/model.json: what the run trained (recog.export's model.json describes an exported embedder)."""
    checkpoints = run_dir / "checkpoints"
    embed = getattr(model, "embed", None)
    return write_json({
        "backbone": backbone, "num_classes": len(classes), "classes": classes,
        "embedding_dim": embed.out_features if embed is not None else None, "top1": top1, "best_top1": best_top1,
        "checkpoints": {name: str(checkpoints / f"{name}.pt") if (checkpoints / f"{name}.pt").exists() else None
                        for name in ("last", "best")},
    }, run_dir / "model.json")
