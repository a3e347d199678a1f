"""Train an image recognition model with recog.

One process (CPU, or the first GPU):
    python train.py
Two processes on one machine (DDP, gloo on CPU / NCCL on GPU):
    torchrun --standalone --nproc_per_node=2 train.py
Four machines with eight GPUs each (run on every machine; HOST is the first one):
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB train.py

Override any config value on the command line, e.g. `epochs=3 batch_size=64 model=resnet18 data=fashion_mnist`.
"""

import sys

import hydra
from omegaconf import DictConfig

from recog.dist import RankTimeout, adopt_slurm_env, print0
from recog.errors import ConfigError
from recog.preempt import EXIT_CODE as PREEMPTED, Preempted
from recog.rundir import register_resolvers
from recog.train import run

adopt_slurm_env()  # `srun python train.py`: torchrun's variables from SLURM's (before Hydra resolves the run dir)
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)["top1"]
    except ConfigError as e:  # a mistake the user can fix: one sentence, no traceback
        print0(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:  # SIGTERM/SIGUSR1: a checkpoint was written; the same command continues the run
        print0(f"preempted: {e}; exit code {PREEMPTED}", file=sys.stderr)
        sys.exit(PREEMPTED)
    except RankTimeout as e:  # said by the rank that noticed, whichever it is
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
