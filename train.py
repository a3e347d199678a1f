"""Train an image recognition model with recog.

One process (CPU, or the first GPU):
    python train.py
Two processes on one machine (DDP, gloo on CPU / NCCL on GPU):
    torchrun --standalone --nproc_per_node=2 train.py
Four machines with eight GPUs each (run on every machine; HOST is the first one):
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB train.py

Override any config value on the command line, e.g. `epochs=3 batch_size=64 model=resnet18 data=fashion_mnist`.
"""

# First, before the slow imports: catch the stop signals. When another rank fails at start, torchrun sends
# this one SIGTERM; caught, it still gets to say what is wrong (or stops cleanly) instead of dying silently.
from recog.preempt import StopOnSignal

STOP = StopOnSignal().install()

import logging  # noqa: E402
import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from recog.dist import adopt_slurm_env, env_rank, print_once_per_node  # noqa: E402
from recog.errors import ConfigError, RecogError, sentence  # noqa: E402
from recog.preempt import Preempted  # noqa: E402
from recog.rundir import register_resolvers  # noqa: E402

adopt_slurm_env()  # `srun python train.py`: torchrun's variables from SLURM's (before Hydra resolves the run dir)
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # Imported here, not above: every data-loader worker imports this script again (CPython's fork server
    # never preloads __main__: it is given no main path), and recog.train pulls in the model, torchvision,
    # TensorBoard: ~4 s of CPU per worker, taken from training. A worker needs none of it.
    from recog.train import run

    try:
        return run(cfg, stop=STOP)["top1"]
    except Preempted as e:  # a stop signal: a checkpoint was written; the same command continues the run
        if env_rank() == 0:  # one line, to the console and (once logging is set up) to train.log
            logging.getLogger("recog").warning("%s: %s; exit code %d", "interrupted" if e.interrupted else
                                               "preempted", e, e.exit_code)
        sys.exit(e.exit_code)
    # Expected failures, each one sentence and exit code 2. A mistake in the config or the paths: every rank found
    # it (or was told of it), so each node says it once.
    except ConfigError as e:
        print_once_per_node(f"error: {sentence(e)}", file=sys.stderr)
        sys.exit(2)
    except RecogError as e:  # unreadable data, a full disk, a lost rank: said by the rank that found it
        print(f"error: {sentence(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:  # a programming error: its whole traceback, exit code 1
        if getattr(e, "reported", False):  # printed already, before the other ranks were told (recog.dist)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
