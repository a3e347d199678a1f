"""One run directory for every rank of a launch, and one run in it at a time.

Hydra resolves `${now:...}` separately in each process, so under torchrun two
ranks started a second apart would create two run directories. `${launch_time:}`
is the same moment for every rank: the first rank to ask stores its clock in
torchrun's key-value store (the agent's, which outlives worker restarts, so a
restarted job also finds its old directory), and every rank reads that value.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timedelta
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from recog import dist
from recog.errors import ConfigError
from recog.files import exclusive
from recog.shell import env_rank

_cache: dict[str, str] = {}


def launch_time(fmt: str = "%Y-%m-%d_%H-%M-%S") -> str:
    if fmt in _cache:
        return _cache[fmt]
    now = datetime.now().strftime(fmt)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        now = _agree_across_ranks(f"recog/launch_time/{fmt}", now)
    _cache[fmt] = now
    return now


def _agree_across_ranks(key: str, mine: str) -> str:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=120))
        return store.compare_set(key, "", mine).decode()  # the first writer's value, for everyone
    # Launched without a torchrun agent (e.g. srun): name the directory after the job instead.
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        return f"job-{job}"
    raise RuntimeError("cannot agree on a run directory across ranks; set hydra.run.dir=DIR explicitly.")


def hold_run_dir(run_dir: Path, ctx: dist.Dist) -> contextlib.AbstractContextManager:
    """The run directory, held by this run for its life: rank 0 holds its lock (recog.files.exclusive), which the
    kernel drops when the process ends, however it ends (so a worker torchrun restarts takes it again). A second
    run given the same directory stops here, before it writes anything there, on every rank (one exchange, the
    first after the process group exists): interleaved checkpoints of two runs would be worse than either."""
    def lock():
        if not ctx.is_main:
            return contextlib.nullcontext()
        try:
            return exclusive(run_dir, "training run")
        except ConfigError as e:
            raise ConfigError(f"{str(e).rstrip('.')} (hydra.run.dir=...).") from None

    return dist.fail_together(lock, ctx, "locking the run directory")


def config_copy_dir(subdir: str, run_dir: str) -> str | None:
    """Where Hydra saves its copy of the config (`hydra.output_subdir`): `subdir` on rank 0, None (no copy) on the
    other ranks, and None when another run holds `run_dir`. Hydra writes that copy before recog's code runs, so
    without this a second run given a busy directory would replace the first run's copy before `hold_run_dir`
    stopped it."""
    if env_rank() != 0:
        return None
    try:
        exclusive(run_dir, "training run").release()  # free now; the run takes it for good in hold_run_dir
    except ConfigError:
        return None
    return subdir


def project_dir() -> str:
    """The folder holding train.py, conf/ and data/: bundled data is found from any working directory."""
    return str(Path(__file__).resolve().parent.parent)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("project_dir", project_dir, replace=True)
    OmegaConf.register_new_resolver("launch_time", launch_time, replace=True)
    OmegaConf.register_new_resolver("config_copy_dir", config_copy_dir, replace=True)


def compose_train_config(*overrides: str, hydra: bool = False) -> DictConfig:
    """conf/train.yaml composed with these overrides, as train.py composes it (its resolvers registered): for the
    tests and benchmarks, which build runs without Hydra's entrypoint. hydra: keep the `hydra` node too."""
    register_resolvers()
    with initialize_config_dir(str(Path(project_dir()) / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)
