"""Hydra multirun of distributed jobs: a summary of the sweep, written when the last job has ended.

`torchrun --standalone --nproc_per_node=2 train.py -m optim.lr=0.1,0.05 seed=1,2` runs the
four jobs one after another; every rank runs each job (a full DDP run with its own process
group and numbered run directory). Rank 0 then writes `summary.md` and `summary.csv` in the
sweep directory: each job's overrides and final metrics, read back from the job directories.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from recog.shell import env_rank

METRICS = ("top1", "best_top1", "recall@1", "map@r", "train_loss", "images_per_s", "epoch", "step")


class SweepSummary(Callback):
    """Configured in conf/train.yaml under hydra.callbacks."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if env_rank() == 0:
            md, _ = write_summary(Path(config.hydra.sweep.dir))
            print(md.read_text(), flush=True)


def read_jobs(sweep_dir: Path) -> list[dict]:
    """One entry per numbered job directory: its number, overrides (key -> value) and metrics (None: no
    metrics.json, the job failed or did not finish)."""
    jobs = []
    job_dirs = (d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit())
    for job_dir in sorted(job_dirs, key=lambda d: int(d.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.exists() else []
        metrics_file = job_dir / "metrics.json"
        jobs.append({
            "job": int(job_dir.name),
            "overrides": dict(o.split("=", 1) for o in overrides if "=" in o),
            "metrics": json.loads(metrics_file.read_text()) if metrics_file.exists() else None,
        })
    return jobs


def summary_table(jobs: list[dict]) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """(header, rows, overrides shared by every job): one column per override that differs between jobs."""
    keys = sorted({k for job in jobs for k in job["overrides"]})
    varying = [k for k in keys if len({job["overrides"].get(k) for job in jobs}) > 1]
    common = {k: jobs[0]["overrides"][k] for k in keys if k not in varying and k in jobs[0]["overrides"]}
    metrics = [m for m in METRICS if any(job["metrics"] and m in job["metrics"] for job in jobs)]
    header = ["job", *varying, *metrics]
    rows = []
    for job in jobs:
        row = [str(job["job"]), *(job["overrides"].get(k, "") for k in varying)]
        if job["metrics"] is None:
            row += ["no metrics.json (failed or unfinished)"] + [""] * (len(metrics) - 1)
        else:
            row += [_format(job["metrics"].get(m)) for m in metrics]
        rows.append(row)
    return header, rows, common


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def write_summary(sweep_dir: Path) -> tuple[Path, Path]:
    header, rows, common = summary_table(read_jobs(sweep_dir))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = [f"# Sweep {sweep_dir}", ""]
    if common:
        lines += ["Every job: " + " ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return sweep_dir / "summary.md", sweep_dir / "summary.csv"
