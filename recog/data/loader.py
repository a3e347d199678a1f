"""The data-loader's worker processes: started from a fork server, stopped with the training process.

A batch (`Batch`) carries its images, labels, the count of samples that could not be read, the worker
that made it, the warnings the worker logged since its last batch, and for training the step of the epoch
it belongs to (what the training loop marks done: the mid-epoch position) and its micro-batches' sizes.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import socket
import threading
import time
from functools import partial
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, get_worker_info

from recog.preempt import SIGNALS as STOP_SIGNALS  # the standard library's signal numbers, no more


class Batch(NamedTuple):
    # (n, C, H, W) uint8, after the transform; see Normalize. data.decode=gpu: a training batch leaves the workers as
    # its images' encoded bytes (recog.data.gpu_decode.EncodedImages), decoded in the training process.
    images: torch.Tensor
    labels: torch.Tensor  # (n,) int64
    skipped: int  # slots of this batch whose sample could not be read or decoded
    worker: int = 0  # the data-loader worker that made it
    warnings: tuple[str, ...] = ()  # logged in a data-loader worker since the last batch: see WorkerWarnings
    step: int = -1  # training: the step of the epoch it is for (recog.data.plan), what the loop marks done
    sizes: tuple[int, ...] = ()  # training: the images of each of the rank's micro-batches, in order; () one


def join_batches(batches: list[Batch]) -> Batch:
    """One step's batches of several micro-batches, one after another; `sizes` says where each ends. Encoded
    images (data.decode=gpu) stay one object per micro-batch: a tuple of them, decoded one by one in the training
    process."""
    if len(batches) == 1:
        return batches[0]
    if not isinstance(batches[0].images, torch.Tensor):
        images = tuple(b.images for b in batches)
    else:
        images = torch.cat([b.images for b in batches if len(b.labels)] or [batches[0].images])
    return Batch(images, torch.cat([b.labels for b in batches]), sum(b.skipped for b in batches),
                 sizes=tuple(len(b.labels) for b in batches))


class WorkerWarnings(logging.Handler):
    """In a data-loader worker, collects recog's warnings (a skipped sample, a retried download) so that
    they travel with the next batch to the training process, which logs them where its own messages go
    (rank 0: the console and train.log). A worker has no log file of its own."""

    _installed: WorkerWarnings | None = None  # one per worker process

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    @classmethod
    def in_this_worker(cls) -> WorkerWarnings | None:
        """The collector of this data-loader worker (installed on first use); None in the training process."""
        if get_worker_info() is None:
            return None
        if cls._installed is None:
            cls._installed = cls()
            logger = logging.getLogger("recog")
            logger.addHandler(cls._installed)
            logger.setLevel(logging.WARNING)
            logger.propagate = False
        return cls._installed

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> tuple[str, ...]:
        messages, self.messages = tuple(self.messages), []
        return messages


def worker_context() -> multiprocessing.context.BaseContext:
    """Start workers from a fork server, not by forking the training process.

    By the time a loader starts, the training process runs threads (gloo/NCCL,
    TensorBoard's writer, OpenMP); forking it can copy a lock that one of them
    holds, and the worker then hangs before its first batch (seen here within
    a few epochs). The fork server is a clean, single-threaded process. A
    worker started this way imports the main script again (seconds), so the
    workers are kept for the whole run (persistent_workers) rather than
    started anew each epoch.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    # The server, and every worker forked from it, ignores the stop signals: torchrun sends SIGTERM to the
    # whole process group of a training process, and SLURM may signal every process of a job, but it is
    # the training process that must act (save a checkpoint, then shut its workers down). An ignored
    # signal stays ignored across the server's exec and its forks.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        multiprocessing.forkserver.ensure_running()  # returns at once: the server imports while the model is built
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return context


# What a worker needs, imported once by the server, so that each worker forked from it starts at once: the data
# pipeline and its transforms (torchvision). The main script is not on the list: CPython never preloads it (3.10-3.13
# pass the server no main path), so each worker imports it again (train.py keeps that import light).
WORKER_PRELOAD = ["torch", "torchvision", "recog.data.stream", "recog.data.augment"]


def fork_worker_server() -> bool:
    """Make this process's fork server (worker_context) now, by forking this process, rather than later as a fresh
    interpreter that imports torch and torchvision all over again. For train.py, at its start: what it has imported
    by then (torch, torchvision, the data pipeline) the server holds at no cost, and the workers forked from it get
    the same modules as from a server that imported them itself. On the default job (2 ranks, 2 cores) that saves
    each rank's server ~5 s of CPU, which it took from the ranks before their first step.

    Only while this process runs no other thread (no process group, no TensorBoard writer, CUDA not initialised:
    a fork copies no lock a thread holds) and has no server yet, on a Python whose fork server this knows (3.10 to
    3.13); otherwise False, and worker_context starts one as usual."""
    server = multiprocessing.forkserver._forkserver
    if (threading.active_count() > 1 or torch.distributed.is_initialized() or torch.cuda.is_initialized()
            or server._forkserver_pid is not None or not hasattr(server, "_forkserver_alive_fd")
            or hasattr(server, "_forkserver_authkey")):  # 3.14 and later: the protocol differs
        return False
    for name in WORKER_PRELOAD:
        importlib.import_module(name)
    multiprocessing.resource_tracker.ensure_running()  # as ensure_running does first: the workers share it
    listener = socket.socket(socket.AF_UNIX)
    address = multiprocessing.connection.arbitrary_address("AF_UNIX")
    listener.bind(address)
    os.chmod(address, 0o600)
    listener.listen()
    alive_r, alive_w = os.pipe()  # the server leaves when its read end sees this process (the writer) gone
    pid = os.fork()
    if pid == 0:  # the server: as multiprocessing.forkserver's, ignoring the stop signals (see worker_context)
        try:
            os.close(alive_w)
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            multiprocessing.forkserver.main(listener.fileno(), alive_r, [])
        finally:
            os._exit(0)
    os.close(alive_r)
    listener.close()
    server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid
    return True


def start_data_worker(trainer_pid: int, _worker_id: int) -> None:
    """worker_init_fn. The DataLoader gives its workers a SIGTERM handler that exits, but a stop signal sent to
    the whole process group (torchrun does that) is for the training process, which saves a checkpoint and
    then shuts its workers down itself: the workers ignore it. Instead they leave as soon as the training
    process is gone (killed, say): their parent is the fork server, so the DataLoader's own check of the
    parent would not see that, and worker and server would keep each other alive."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_exit_when_gone, args=(trainer_pid,), daemon=True, name="recog-watch-trainer").start()


def stop_data_workers(timeout_s: float = 10.0) -> None:
    """End this process's data-loader workers at once, for an exit other than the normal end of a run.

    They ignore the stop signals (see start_data_worker), so Python's own exit, which sends them SIGTERM
    and then waits for them, would wait forever. SIGKILL is safe here: a worker holds nothing that must be
    saved. The fork server leaves by itself when this process ends.
    """
    workers = multiprocessing.active_children()  # this process's children: its data-loader workers
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout_s)


def _exit_when_gone(pid: int, every_s: float = 1.0) -> None:
    while True:
        time.sleep(every_s)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)


MAX_AUTO_WORKERS = 8  # num_workers=auto never starts more per rank: beyond it, more processes mostly cost memory


def loader_workers(setting: int | str, local_world_size: int, cores: int | None = None) -> int:
    """data.num_workers: a number as given, or for `auto` this node's cores (the CPUs this process may run on)
    shared out among its ranks, 1 to MAX_AUTO_WORKERS per rank. 2 cores, 2 ranks: 1 worker each (4 per rank, with
    a train and a test loader, would be 16 processes on 2 cores, each importing the main script as it starts)."""
    if setting != "auto":
        return int(setting)
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, local_world_size)))


def make_loader(dataset, num_workers: int, pin_memory: bool, batch_sampler=None, collate_fn=None) -> DataLoader:
    """A ShardStream forms its batches inside the workers (batch_size=None: one pickled tensor per batch);
    a map-style data set gets its batches of indices from `batch_sampler`."""
    batching = {"batch_sampler": batch_sampler, "collate_fn": collate_fn} if batch_sampler else {"batch_size": None}
    if not num_workers:
        return DataLoader(dataset, pin_memory=pin_memory, **batching)
    return DataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=4,
                      multiprocessing_context=worker_context(), persistent_workers=True,
                      worker_init_fn=partial(start_data_worker, os.getpid()), **batching)
