"""Stream batches from WebDataset tar shards, split across ranks and data-loader workers.

The split is decided by `recog.data.plan` (pure, tested without processes);
this module only reads what the plan says. Batches are formed from fixed
*slots*: a sample that cannot be read or decoded leaves its slot empty, so a
bad sample makes one batch smaller but never changes the number of batches,
and no rank runs a different number of steps (which would hang DDP).
"""

from __future__ import annotations

import io
import itertools
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import random
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import islice
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from PIL import Image

from recog.data.manifest import Manifest
from recog.data.plan import Piece, num_batches, rank_pieces, slice_pieces, worker_pieces
from recog.data.source import FetchError, ShardSource
from recog.errors import DataError
from recog.preempt import SIGNALS as STOP_SIGNALS  # the standard library's signal numbers, no more

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
MAX_WORKERS = 256  # data-loader workers per process that a mid-epoch position can describe


class Batch(NamedTuple):
    images: torch.Tensor  # (n, C, H, W) uint8, after the transform; see Normalize
    labels: torch.Tensor  # (n,) int64
    skipped: int  # slots of this batch whose sample could not be read or decoded
    worker: int = 0  # the data-loader worker that made it: the training loop counts batches per worker
    warnings: tuple[str, ...] = ()  # logged in a data-loader worker since the last batch: see WorkerWarnings


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


def read_pieces(manifest: Manifest, pieces: list[Piece], strict: bool,
                source: ShardSource | None = None) -> Iterator[dict | None]:
    """Yield exactly one item per planned sample: the raw sample dict, or None if it could not be read.

    Damaged data (a truncated tar, a shard failing its sha256) is skipped and
    counted unless `strict`; a server that stays unreachable stops the run.
    """
    source = source or ShardSource()
    for piece in pieces:
        url, produced = manifest.url(piece.shard), 0
        try:
            with source.open(url, manifest.shards[piece.shard].sha256) as stream:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                for sample in islice(wds.tariterators.group_by_keys(files), piece.start, piece.stop):
                    produced += 1
                    yield sample
        except FetchError:
            raise
        except Exception as e:  # a truncated or unreadable tar, a sha256 mismatch, ...
            if strict:
                raise DataError(f"shard {url} could not be read ({e}); fix or rewrite it, or set data.strict=false.")
            log.warning("shard %s: read failed after %d of %d samples (%s); skipping the rest", url, produced,
                        len(piece), e)
        if produced < len(piece):
            if strict:
                raise DataError(f"shard {url} holds fewer samples than its manifest says; rewrite the shards.")
            log.warning("shard %s: %d planned samples missing, skipped", url, len(piece) - produced)
            yield from [None] * (len(piece) - produced)


def shuffled_blocks(items: Iterator, block: int, rng: random.Random) -> Iterator:
    """Shuffle within consecutive blocks of `block` items: memory is bounded, order is reproducible."""
    while chunk := list(islice(items, block)):
        rng.shuffle(chunk)
        yield from chunk


def skip_whole_blocks(pieces: list[Piece], skip: int, block: int, rng: random.Random) -> tuple[list[Piece], int]:
    """Start `shuffled_blocks` `skip` items later without reading the whole blocks before that point.

    Returns the pieces left to read and how many items of the first shuffled block
    to drop. `rng` is advanced as if the skipped blocks had been shuffled (a
    shuffle's draws depend only on the length), so what follows is unchanged.
    """
    whole = skip // block
    for _ in range(whole):
        rng.shuffle([None] * block)
    total = sum(len(p) for p in pieces)
    return slice_pieces(pieces, min(whole * block, total), total), skip - whole * block


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor C×H×W. Raises on damaged data."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft(mode, None)  # decode straight into the wanted mode
        if image.mode != mode:
            image = image.convert(mode)
        pixels = torch.from_numpy(np.array(image))  # decodes (raises on damaged data) into a writable array
    return pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1)


def decode_sample(sample: dict, channels: int) -> tuple[torch.Tensor, int]:
    """Raw sample dict -> (uint8 image tensor C×H×W, class index). Raises on anything undecodable."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"no image ({'/'.join(IMAGE_KEYS)}) in sample {sample.get('__key__')}")
    return decode_image(sample[key], channels), int(sample["cls"])


class ShardStream(IterableDataset):
    """One rank's batches of one epoch; call `set_epoch` before iterating each epoch."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,  # on uint8 images: augmentation
        channels: int = 1,
        train: bool = True,
        seed: int = 0,
        shuffle_block: int = 1000,
        strict: bool = False,
        source: ShardSource | None = None,
    ):
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.batch_size, self.transform, self.channels = batch_size, transform, channels
        self.train, self.seed, self.shuffle_block, self.strict = train, seed, shuffle_block, strict
        self.source = source or ShardSource()
        # Shared memory, so that persistent workers (in other processes) see set_epoch().
        self._epoch = multiprocessing.RawValue("q", 0)
        self._consumed = multiprocessing.RawArray("q", MAX_WORKERS)
        self._image_shape: tuple[int, ...] | None = None  # of the last decoded image, for empty batches

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int, consumed: Sequence[int] = ()) -> None:
        """Call before iterating the loader: its workers start the epoch's plan then.

        consumed: to resume mid-epoch, how many batches of this epoch each data-loader
        worker had delivered (`Batch.worker` counts); each worker skips exactly those.
        """
        if len(consumed) > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} data-loader workers")
        self._epoch.value = epoch
        self._consumed[:] = [*consumed, *[0] * (MAX_WORKERS - len(consumed))]

    def pieces(self) -> list[Piece]:
        """This rank's samples: the training split pads (equal steps), evaluation does not (exactly once)."""
        return rank_pieces(self.manifest.shard_sizes, self.rank, self.world_size, epoch=self.epoch,
                           seed=self.seed, shuffle=self.train, pad=self.train)

    def __len__(self) -> int:
        return num_batches(sum(len(p) for p in self.pieces()), self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        stream_id = f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
        pieces = worker_pieces(self.pieces(), self.batch_size, worker, num_workers)
        done = self._consumed[worker]  # batches delivered before a mid-epoch checkpoint: not again
        skip = done * self.batch_size
        if self.train:
            rng = random.Random(f"samples/{stream_id}")
            pieces, skip = skip_whole_blocks(pieces, skip, self.shuffle_block, rng)
            items = shuffled_blocks(read_pieces(self.manifest, pieces, self.strict, self.source),
                                    self.shuffle_block, rng)
        else:
            total = sum(len(p) for p in pieces)
            pieces, skip = slice_pieces(pieces, min(skip, total), total), 0
            items = read_pieces(self.manifest, pieces, self.strict, self.source)
        items = islice(items, skip, None)  # read, never decoded
        warnings = WorkerWarnings.in_this_worker()
        for index in itertools.count(done):
            if not (slots := list(islice(items, self.batch_size))):
                break
            # Augmentation draws from torch's RNG, seeded per batch: a batch looks the same whether
            # the epoch ran through or resumed just before it. (fork_rng: the caller's RNG is left alone.)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{stream_id}/{index}".encode()))
                batch = self._collate(slots)
            yield batch._replace(worker=worker, warnings=warnings.take() if warnings else ())

    def _collate(self, slots: list[dict | None]) -> Batch:
        images, labels = [], []
        for sample in slots:
            if sample is None:
                continue
            try:
                image, label = decode_sample(sample, self.channels)
            except Exception as e:
                where = f"{sample.get('__url__')}:{sample.get('__key__')}"
                if self.strict:
                    raise DataError(f"sample {where} could not be decoded ({e}); fix it or set data.strict=false.")
                log.warning("skipping undecodable sample %s (%s)", where, e)
                continue
            images.append(self.transform(image) if self.transform else image)
            labels.append(label)
        if images:
            self._image_shape = tuple(images[0].shape)
            stacked = torch.stack(images)
        else:  # every sample unreadable: still a batch (of zero images), so the step count stays the same
            stacked = torch.empty((0, *self._image_shape) if self._image_shape else (0,))
        return Batch(stacked, torch.tensor(labels, dtype=torch.int64), len(slots) - len(images))


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
    # With the main script preloaded too, a worker forked from the server need not import it again.
    context.set_forkserver_preload(["__main__", "torch", "recog.data.stream"])
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


class Normalize:
    """uint8 batch -> float32 (x / 255 - mean) / std, on the batch's device.

    Workers hand over uint8 images (a quarter of the bytes between processes
    and to the GPU) and augment them as uint8 (about 4x faster for resizing
    than on float); the conversion happens once per batch, vectorised, here.
    """

    def __init__(self, mean, std, device: torch.device | str = "cpu"):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


def make_loader(dataset, num_workers: int, pin_memory: bool, batch_sampler=None, collate_fn=None) -> DataLoader:
    """A ShardStream forms its batches inside the workers (batch_size=None: one pickled tensor per batch);
    a map-style data set gets its batches of indices from `batch_sampler`."""
    batching = {"batch_sampler": batch_sampler, "collate_fn": collate_fn} if batch_sampler else {"batch_size": None}
    if not num_workers:
        return DataLoader(dataset, pin_memory=pin_memory, **batching)
    return DataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=4,
                      multiprocessing_context=worker_context(), persistent_workers=True,
                      worker_init_fn=partial(start_data_worker, os.getpid()), **batching)
