"""The process group: setup from torchrun's (or SLURM's) environment, teardown, the small collectives recog's
commands use, and a failed or timed-out collective told in one sentence (`collective_failures`).

`setup()` returns plain values and also works without torchrun (world size 1,
no process group). Nothing here runs at import time. Elsewhere: DDP around the
model (recog/parallel.py), and the run directory's name, agreed over torchrun's
store before any process group exists (recog/rundir.py).
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from recog.errors import ConfigError, RecogError
from recog.preempt import Preempted


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu3" -> "gpu07" (what `scontrol show hostnames`
    would list first)."""
    prefix, ranges, suffix = re.match(r"([^,\[]*)(?:\[([^\]]+)\]([^,]*))?", nodelist.strip()).groups()
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0] + suffix


def slurm_launch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from
    SLURM's, for processes that `srun` started directly (one task per GPU, no torchrun). Empty when torchrun
    set them already, or when this is no SLURM job step of several tasks."""
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ:
        return {}
    world_size = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if world_size < 2:
        return {}
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not; start the tasks with srun.")
    return {
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": environ.get("SLURM_NTASKS_PER_NODE") or str(world_size // nodes),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
        # the same port on every task of the job, and different for two jobs sharing a node
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000),
    }


def adopt_slurm_env() -> None:
    """Under `srun python train.py`, set torchrun's variables from SLURM's; call before anything reads them."""
    os.environ.update(slurm_launch_env(os.environ))


def setup(backend: str | None = None, timeout_s: float = 600.0) -> Dist:
    """Join the process group torchrun describes in RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT.

    backend: None picks NCCL when CUDA is available, gloo otherwise.
    timeout_s: how long a collective waits for a missing rank before failing.
    """
    adopt_slurm_env()  # again: a task started by Hydra's submitit launcher did not run train.py's top level
    if "WORLD_SIZE" not in os.environ:  # plain `python train.py`
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return Dist(0, 0, 1, 1, device, None)

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("dist.backend=nccl needs CUDA, which this machine lacks; use dist.backend=gloo.")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                f"start at most {torch.cuda.device_count()} processes per node (--nproc_per_node)."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # On GPUs the process group gets a gloo backend for CPU tensors beside NCCL: small control messages
    # (the stop flags, see AnyRankFlag) then travel without waiting for the GPU.
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if backend == "nccl" else backend,
        store=_job_store(rank, world_size, timeout_s),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return Dist(rank, local_rank, world_size, local_world_size, device, backend)


_store: dist.Store | None = None  # the launcher's key-value store, connected once per process
_jobs = 0  # process groups set up in this process so far: several in a Hydra multirun


def _job_store(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The launcher's store (torchrun's agent store, or one rank 0 serves under srun), under a prefix of
    its own for each process group this process sets up. The processes' addresses are exchanged through
    it; without the prefix, the second job of a multirun (or a restarted worker) could read the first
    one's stale addresses and wait for a peer that is gone."""
    global _store, _jobs
    if _store is None:
        _store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timedelta(seconds=timeout_s)))
    _jobs += 1
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"recog/attempt-{attempt}/job-{_jobs}", _store)


# How often the ranks post their stop flags, at most: about once a second (never more than once a step). A post
# costs each rank ~1 ms of a CPU thread (gloo's): posted every step, that was 0.7 % of the default job's ~145-ms
# step on 2 cores and 25 % of a 10-ms step (bench/README.md, "Against other trainers"). Once a second, a stop
# signal is acted on at most ~1 s plus a step later: nothing against the 30 s a scheduler gives before SIGKILL.
FLAG_SECONDS = 1.0  # train.py takes dist.stop_check_s (conf/train.yaml), the same by default


class AnyRankFlag:
    """Whether any rank has raised a flag (or each of a few flags), learnt one call after it was posted, so that
    no step waits for it.

    Every rank calls `exchange(*mine)` once per step, with as many flags as the other ranks. Every `gap` calls it
    posts this rank's flags in one asynchronous all-reduce (MAX: a flag is up if any rank raised it); the call
    after a post returns that post's result, which has long finished by then; every other call returns no flags
    up. Every rank gets the same answer at the same call. Several flags (a stop signal, and rank 0's clock
    saying a checkpoint is due) cost no more than one: one small tensor. Flags are levels (a caught signal stays
    caught), so one raised between posts goes out with the next.

    The gap: each post also carries each rank's proposal, `seconds` over its measured time per call since the
    previous post (1 to `max_calls`), and the ranks take the smallest, learnt with the flags: every rank counts
    the same calls to the next post. The first post proposes 1; `seconds=0` posts every call.
    """

    def __init__(self, seconds: float = FLAG_SECONDS, max_calls: int = 1000):
        self.seconds, self.max_calls = seconds, max_calls
        self._sent, self._work = None, None
        self._gap, self._calls, self._posted_at = 1, 0, None  # the agreed gap; calls since the last post, its time

    def exchange(self, *mine: bool) -> tuple[bool, ...]:
        if not dist.is_initialized():
            return tuple(bool(flag) for flag in mine)
        seen = (False,) * len(mine)
        if self._work is not None:  # posted at the previous call: every rank reads it now
            self._work.wait()
            *flags, minus_gap = self._sent.tolist()
            seen, self._gap, self._work = tuple(bool(flag) for flag in flags), -minus_gap, None
        self._calls += 1
        if self._calls >= self._gap:
            self._post(mine)
        return seen

    def _post(self, mine: tuple[bool, ...]) -> None:
        now, proposal = time.monotonic(), 1
        if self._posted_at is not None and self.seconds > 0:
            per_call = max((now - self._posted_at) / self._calls, 1e-9)
            proposal = max(1, min(self.max_calls, int(self.seconds / per_call)))
        self._calls, self._posted_at = 0, now
        # a CPU tensor: gloo carries it, even beside NCCL; -gap under MAX is the smallest proposal
        self._sent = torch.tensor([int(flag) for flag in mine] + [-proposal])
        self._work = dist.all_reduce(self._sent, op=dist.ReduceOp.MAX, async_op=True)

    def finish(self) -> None:
        """Wait for the last post: every rank posted it, so this returns at once."""
        if self._work is not None:
            self._work.wait()
            self._work = None


def control_barrier() -> None:
    """Wait until every rank is here (an all-reduce of a CPU tensor: no GPU involved)."""
    if dist.is_initialized():
        dist.all_reduce(torch.zeros(1))


class RankTimeout(RecogError):
    """A collective waited longer than the configured timeout for another rank."""


class PeerLost(RecogError):
    """Another rank went away (it failed and exited, or was killed) while this one waited for it."""


def is_timeout(error: BaseException) -> bool:
    """gloo reports a missing peer as 'Timed out waiting ...', or, for an operation on a connection an earlier
    timeout closed (DDP's buffer broadcast is several), 'Application timeout caused pair closure'; NCCL's
    watchdog as a DistBackendError timeout."""
    text = str(error).lower()
    return "timed out" in text or "timeout caused" in text or "timeout" in type(error).__name__.lower()


def is_peer_lost(error: BaseException) -> bool:
    """gloo reports a peer whose process ended as a closed or reset connection; NCCL as a remote error."""
    text = str(error).lower()
    return any(s in text for s in ("closed by peer", "reset by peer", "broken pipe", "remote process exited",
                                   "connection refused"))


@contextmanager
def collective_failures(ctx: Dist, timeout_s: float, stop=None):
    """A collective that failed because another rank went away becomes one sentence: RankTimeout (it did not
    answer within `timeout_s`) or PeerLost (its connection closed). With `stop` (a StopOnSignal) that caught a
    signal, it is Preempted instead: torchrun stopped this rank's job too."""
    try:
        yield
    except RuntimeError as e:
        if stop is not None and stop.caught:
            raise Preempted("stopped while waiting for the other ranks", stop.caught) from e
        if ctx.is_distributed and is_timeout(e):
            raise RankTimeout(f"rank {ctx.rank}: another rank did not answer within dist.timeout_s={timeout_s:g} s "
                              "(it stopped, hung or died); stopping rather than waiting longer.") from e
        if ctx.is_distributed and is_peer_lost(e):
            raise PeerLost(f"rank {ctx.rank}: another rank went away (its error, if it had one, is above); "
                           "stopping too.") from e
        raise


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op for a single process). Returns the tensor, reduced in place."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_object(value) -> list:
    """Every rank's picklable `value`, in rank order (`[value]` without a process group)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` (same shape on every rank), concatenated in rank order.

    The other ranks' parts are constants here; this rank's part keeps its
    gradient. A loss on the gathered batch, multiplied by the world size, then
    gives each rank exactly its share of the gradient that one process would
    get on the whole global batch (DDP averages the shares over ranks).
    """
    if not dist.is_initialized():
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def all_gather_uneven(local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local`, concatenated in rank order, when ranks hold different numbers of rows."""
    return all_gather_rows(local)[0]


def all_gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`all_gather_uneven`, and where this rank's rows start in it."""
    if not dist.is_initialized():
        return local, 0
    sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)], device=local.device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sum(sizes[: dist.get_rank()])


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's buffers (BatchNorm running statistics) equal to rank `src`'s."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def run_on_rank0(fn, ctx: Dist, what: str):
    """Call `fn()` on rank 0 only and hand its result to every rank.

    If `fn` raises, every rank raises, so no rank waits forever for a result that
    will not come: rank 0 its own error (a programming error keeps its traceback),
    the others a ConfigError carrying rank 0's sentence. Used so that only rank 0
    reads a file.
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as e:  # raised below, on every rank
            error = e
    if ctx.is_distributed:
        _report_now(error)
        box = [(result, _describe(error))]
        dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
        result, message = box[0]
        if message is not None and error is None:
            raise _told(message, 0, what)
    if error is not None:
        raise error
    return result


def fail_together(fn, ctx: Dist, what: str):
    """Run `fn()` on this rank; if it raises on any rank, every rank raises.

    For work that may fail on some ranks only (a file missing on one node):
    instead of one rank leaving while the others wait in the next collective,
    all of them stop here, after one exchange. A rank that failed raises its own
    error; the others raise a ConfigError with the first failed rank's sentence,
    so the sentence reaches the user whichever rank found the problem.
    """
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # re-raised below, on this rank and (as a message) on the others
        error = e
    if ctx.is_distributed:
        _report_now(error)
        messages: list = [None] * ctx.world_size
        dist.all_gather_object(messages, _describe(error))
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if failed and error is None:
            raise _told(failed[0][1], failed[0][0], what)
    if error is not None:
        raise error
    return result


def _report_now(error: Exception | None) -> None:
    """Print a programming error's traceback before the other ranks hear of it: once told, they stop, and
    torchrun then stops this rank too (SIGTERM), possibly before Python's own printing at exit. Marked
    `reported`, so that train.py does not print it a second time."""
    if error is not None and not isinstance(error, RecogError):
        traceback.print_exception(error, file=sys.stderr)
        sys.stderr.flush()
        error.reported = True


def _describe(error: Exception | None) -> str | None:
    """What the other ranks are told of an error: its sentence, or "!" + type and message for a programming
    error (whose traceback only the rank that raised it prints)."""
    if error is None:
        return None
    return str(error) if isinstance(error, RecogError) else f"!{type(error).__name__}: {error}"


def _told(message: str, rank: int, what: str) -> ConfigError:
    """The error a rank raises for another rank's failure, from `_describe`'s message."""
    if message.startswith("!"):
        return ConfigError(f"{what} failed on rank {rank} ({message[1:]}); see its traceback above.")
    return ConfigError(message)
