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

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from recog.dist import adopt_slurm_env  # noqa: E402
from recog.rundir import register_resolvers  # noqa: E402
from recog.shell import leave, run_command  # noqa: E402

adopt_slurm_env()  # `srun python train.py`: torchrun's variables from SLURM's (before Hydra resolves the run dir)
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # Imported here, not above: every data-loader worker imports this script again (CPython's fork server
    # never preloads __main__: it is given no main path), and recog.train pulls in the model, torchvision,
    # TensorBoard: ~4 s of CPU per worker, taken from training. A worker needs none of it.
    from recog.train import run

    if cfg.data.num_workers != 0:  # the data-loader workers' fork server, forked now: see the function
        from recog.data.loader import fork_worker_server

        fork_worker_server()
    metrics = {}
    code = run_command(lambda: metrics.update(run(cfg, stop=STOP)))  # a failure: one sentence, its exit code
    if code:
        leave(code)
    return metrics["top1"]


if __name__ == "__main__":
    main()
