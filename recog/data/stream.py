"""Stream batches from WebDataset tar shards, split across ranks and data-loader workers.

Decoding is `recog.data.decode`; the worker processes are `recog.data.loader`.

The split is decided by `recog.data.plan` (pure, tested without processes);
this module only reads what the plan says. Batches are formed from fixed
*slots*: a sample that cannot be read or decoded leaves its slot empty, so a
bad sample makes one batch smaller but never changes the number of batches,
and no rank runs a different number of steps (which would hang DDP).
"""

from __future__ import annotations

import logging
import multiprocessing
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from itertools import groupby, islice
from typing import BinaryIO

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from recog.data.decode import Decode, decode_or_skip
from recog.data.gpu_decode import EncodedImages, keep_encoded
from recog.data.loader import Batch, WorkerWarnings, join_batches
from recog.data.manifest import Manifest
from recog.data.offsets import ON_ITS_OWN, IndexMismatch, ShardOffsets, read_indexed
from recog.data.plan import (
    MicroBatchPlan,
    Mix,
    Piece,
    epoch_samples,
    epoch_steps,
    num_batches,
    pick,
    rank_micro_batches,
    rank_pieces,
    worker_pieces,
    worker_steps,
)
from recog.data.source import FetchError, ShardSource
from recog.errors import DataError

log = logging.getLogger(__name__)

MAX_RANGES = 1024  # [start, stop) ranges of steps done that a mid-epoch position can hold
UNDECODABLE = object()  # kept in place of a sample that could not be decoded (ShardStream.keep_decoded)


def fits_in_memory(manifest: Manifest, budget_mb: float) -> bool:
    """Whether every image of these shards, decoded (uint8, at the largest recorded size), fits in `budget_mb`.
    False when the manifest records no sizes (shards written by other tools)."""
    stats = manifest.stats
    if not stats or budget_mb <= 0:
        return False
    largest = stats["channels"] * stats["height"]["max"] * stats["width"]["max"]
    return manifest.num_samples * largest <= budget_mb * 2**20


def read_pieces(manifest: Manifest, pieces: list[Piece], strict: bool, source: ShardSource | None = None,
                offsets: ShardOffsets | None = None) -> Iterator[dict | None]:
    """Yield exactly one item per planned sample: the raw sample dict, or None if it could not be read.

    offsets: where the shards' samples lie (their index): each piece is read in a few large reads, and
    neighbouring pieces of one shard through one open file. Shards it has no layout for, and the rest of a shard
    that does not match its layout, go through the tar headers. Damaged data (a truncated tar, a shard failing
    its sha256) is skipped and counted unless `strict`; a server that stays unreachable stops the run.
    """
    source = source or ShardSource()
    for shard, group in groupby(pieces, key=lambda p: p.shard):
        with closing(OpenShard(source, manifest, shard)) as opened:
            for piece in group:
                yield from _read_piece(opened, piece, strict, offsets)


class OpenShard:
    """One shard for a run of its pieces: its URL, sha256 and labels looked up once, and read by its index through
    one open file (read_indexed seeks to each piece); a stream that cannot seek (a URL scheme webdataset opens) is
    opened again for each piece, as it is read from its start."""

    def __init__(self, source: ShardSource, manifest: Manifest, shard: int):
        self.source, self.shard = source, shard
        self.url, self.sha256 = manifest.url(shard), manifest.shards[shard].sha256
        self.labels = manifest.relabel(shard)  # a union's: its folder's labels -> the run's
        self.stream: BinaryIO | None = None

    @contextmanager
    def use(self) -> Iterator[BinaryIO]:
        if self.stream is not None:
            yield self.stream
            return
        stream = self.source.open(self.url, self.sha256)
        if not stream.seekable():
            with stream:
                yield stream
            return
        self.stream = stream
        yield stream

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def _read_piece(shard: OpenShard, piece: Piece, strict: bool, offsets: ShardOffsets | None) -> Iterator[dict | None]:
    """read_pieces of one piece of `shard`."""
    url, labels, produced = shard.url, shard.labels, 0
    layout = offsets.of(piece.shard) if offsets else None
    try:
        if layout is not None:
            try:
                with shard.use() as stream:
                    for sample in read_indexed(stream, url, layout, piece.start, piece.stop):
                        produced += 1
                        yield relabelled(sample, labels)
            except IndexMismatch as e:
                offsets.drop(piece.shard, url, str(e))
                layout = None
        if layout is None:
            with shard.source.open(url, shard.sha256) as stream:
                members = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                for sample in islice(wds.tariterators.group_by_keys(members), piece.start + produced, piece.stop):
                    produced += 1
                    yield relabelled(sample, labels)
    except FetchError:
        raise
    except Exception as e:  # a truncated or unreadable tar, a sha256 mismatch, ...
        if strict:
            raise DataError(f"shard {url} could not be read ({e}); fix or rewrite it, or set "
                            "data.strict=false.") from e
        log.warning("shard %s: read failed after %d of %d samples (%s); skipping the rest", url, produced,
                    len(piece), e)
    if produced < len(piece):
        if strict:
            raise DataError(f"shard {url} holds fewer samples than its manifest says; rewrite the shards.")
        log.warning("shard %s: %d planned samples missing, skipped", url, len(piece) - produced)
        yield from [None] * (len(piece) - produced)


def relabelled(sample: dict, labels: Sequence[int] | None) -> dict:
    """`sample` with its label (its folder's) replaced by the run's, `labels[own]`. A label that is no number, or
    outside its folder's classes, is left unreadable: the sample is then skipped and counted as undecodable."""
    if labels is None or "cls" not in sample:
        return sample
    own = sample["cls"]
    try:
        if not 0 <= int(own) < len(labels):  # -1 would index from the end: another class, said nowhere
            raise IndexError(own)
        sample["cls"] = str(labels[int(own)]).encode()
    except (ValueError, IndexError):
        sample["cls"] = f"label {own!r}, not one of its folder's {len(labels)} classes".encode()
    return sample


class MicroBatchReader:
    """One micro-batch's samples for the steps a data-loader worker makes, each batch in the order its plan says.

    by_sample=False: the worker's blocks are read in stream order (a block this worker has no step in, between two it
    has, is read and dropped), each held whole and shuffled. by_sample=True (shards read by their index, images large
    enough to be read one by one anyway: see `by_sample`): each step reads only its own samples, in stream order, and
    puts them in the plan's order; the same batches, without reading a whole block before a block's first batch
    (115 MB for 1,000 photos: a stall in which the other workers' batches wait) and without reading the samples of a
    block shared with another worker twice."""

    def __init__(self, plan: MicroBatchPlan, steps: Sequence[int], read: Callable[[list[Piece]], Iterator],
                 by_sample: bool = False):
        self.plan, self.read, self.by_sample = plan, read, by_sample
        blocks = [plan.block_of(s) for s in steps if s * plan.batch_size < len(plan)]
        self.next_block = blocks[0] if blocks else 0
        self.items = read(plan.block_pieces(blocks[0], blocks[-1])) if blocks and not by_sample else iter(())
        self.block, self.shuffled, self.order, self.pieces = -1, [], [], []  # pieces, order: by_sample's block

    def step(self, step: int) -> list:
        """The items of step `step`'s batch of this micro-batch ([] past its stretch's end); steps in increasing
        order."""
        plan = self.plan
        if step * plan.batch_size >= len(plan):
            return []
        block = plan.block_of(step)
        if self.by_sample:
            if self.block != block:  # once per block, not per step
                self.block, self.order, self.pieces = block, plan.block_order(block), plan.block_pieces(block, block)
            mine = self.order[plan.step_slice(step)]  # positions in the block, in the batch's order
            wanted = sorted(mine)
            items = dict(zip(wanted, self.read(pick(self.pieces, wanted))))
            return [items[i] for i in mine]
        while self.block != block:
            items = list(islice(self.items, plan.block_length(self.next_block)))
            self.block, self.next_block = self.next_block, self.next_block + 1
            if self.block == block:
                self.shuffled = [items[i] for i in plan.block_order(block)]
        return self.shuffled[plan.step_slice(step)]


def by_sample(offsets: ShardOffsets, pieces: Sequence[Piece]) -> bool:
    """Whether a reader of `pieces` should read each step's samples on their own (MicroBatchReader): every shard has
    its index, and the images average ON_ITS_OWN bytes or more, which read_indexed reads one by one in any case (a
    seek and a read each). Smaller ones (the default job's 28-pixel PNGs: a 1,000-sample block is ~1.5 MB) are read a
    block at a time in a few large reads."""
    size, samples = 0, 0
    for p in pieces:
        if (layout := offsets.of(p.shard)) is None:
            return False
        size, samples = size + int(layout.size[p.start:p.stop].sum()), samples + len(p)
    return samples > 0 and size >= ON_ITS_OWN * samples


class ShardStream(IterableDataset):
    """One rank's batches of one epoch; call `set_epoch` before iterating each epoch.

    Training (`train=True`): each item is one step: a batch from each of this rank's micro-batches
    (recog.data.plan), one after another (`Batch.sizes`), made by the worker `worker_steps` gives the step to.
    Evaluation: this rank's slice of the stream in batches, each sample exactly once."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,  # on uint8 images: augmentation
        decode: Decode | None = None,  # image bytes -> uint8 C×H×W; None: decode_image
        channels: int = 1,
        train: bool = True,
        seed: int = 0,
        shuffle_block: int = 1000,
        strict: bool = False,
        source: ShardSource | None = None,
        keep_decoded: bool = False,
        encoded: bool = False,  # data.decode=gpu: batches of EncodedImages, undecoded (decode, transform unused)
        micro_batches: int | None = None,  # training: a step's micro-batches (recog.data.plan); None: one per rank
        mix: Mix | None = None,  # training: the share of each folder of a union an epoch reads (data.mix)
    ):
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.micro_batches, self.mix = micro_batches or world_size, mix
        self.batch_size, self.transform, self.channels, self.decode = batch_size, transform, channels, decode
        self.encoded = encoded
        if encoded:  # the training process decodes and augments (recog.data.gpu_decode); kept: the bytes
            self.decode, self.transform = keep_encoded, None
        self.train, self.seed, self.shuffle_block, self.strict = train, seed, shuffle_block, strict
        self.source = source or ShardSource()
        # Shared memory, so that persistent workers (in other processes) see set_epoch().
        self._epoch = multiprocessing.RawValue("q", 0)
        self._done = multiprocessing.RawArray("q", 2 * MAX_RANGES + 1)  # count, then start, stop, start, ...
        self._image_shape: tuple[int, ...] | None = None  # of the last decoded image, for empty batches
        # keep_decoded: each decoded image (before the transform) is kept in this process's memory, so that
        # later epochs read no shard and decode nothing again. For data sets that fit in memory many times over
        # (see fits_in_memory): each worker may end up holding all of it. Keyed by (shard, index in shard);
        # UNDECODABLE for a sample that could not be decoded (skipped and counted every epoch, logged once).
        # What `decode` gives is kept: it must be the whole image (not CropWhileDecoding's random crop).
        self.keep_decoded = keep_decoded
        self._decoded: dict[tuple[int, int], tuple[torch.Tensor, int] | object] = {}
        self._offsets: ShardOffsets | None = None  # loaded on the first read, in the process that reads

    def __getstate__(self):  # each data-loader worker loads the shards' offsets itself, when it first reads
        return {**self.__dict__, "_offsets": None}

    def offsets(self) -> ShardOffsets:
        """Where each shard's samples lie (from the shards' index), loaded once per process."""
        if self._offsets is None:
            self._offsets = ShardOffsets.load(self.manifest, self.source)
        return self._offsets

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int, done: Sequence[Sequence[int]] = ()) -> None:
        """Call before iterating the loader: its workers start the epoch's plan then.

        done: to resume a training epoch, the steps already trained on ([start, stop) ranges, as
        `recog.data.plan.mark_done` keeps them); the workers make only the others.
        """
        if len(done) > MAX_RANGES:
            raise ValueError(f"at most {MAX_RANGES} ranges of steps done")
        self._epoch.value = epoch
        flat = [x for r in done for x in r]
        self._done[: 1 + len(flat)] = [len(done), *flat]

    def done(self) -> list[list[int]]:
        n = self._done[0]
        return [[self._done[1 + 2 * i], self._done[2 + 2 * i]] for i in range(n)]

    def pieces(self) -> list[Piece]:
        """Evaluation: this rank's slice of the stream, in shard order, each sample exactly once (training reads
        micro-batches: _steps)."""
        return rank_pieces(self.manifest.shard_sizes, self.rank, self.world_size, shuffle=False)

    def __len__(self) -> int:
        """Training: the epoch's steps (every rank the same); evaluation: this rank's batches."""
        if self.train:
            return epoch_steps(epoch_samples(self.manifest.shard_sizes, self.mix), self.micro_batches, self.batch_size)
        return num_batches(sum(len(p) for p in self.pieces()), self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        warnings = WorkerWarnings.in_this_worker()
        for batch in self._steps(worker, num_workers) if self.train else self._slice(worker, num_workers):
            yield batch._replace(worker=worker, warnings=warnings.take() if warnings else ())

    def _steps(self, worker: int, num_workers: int) -> Iterator[Batch]:
        """This worker's steps of the training epoch, each a batch from every micro-batch of this rank."""
        steps = worker_steps(len(self), worker, num_workers, self.done())
        plans = [MicroBatchPlan.make(self.manifest.shard_sizes, m, self.micro_batches, batch_size=self.batch_size,
                                     block=self.shuffle_block, epoch=self.epoch, seed=self.seed, mix=self.mix)
                 for m in rank_micro_batches(self.micro_batches, self.rank, self.world_size)]
        readers = [MicroBatchReader(plan, steps, self._read, by_sample(self.offsets(), plan.pieces))
                   for plan in plans]
        for step in steps:
            batches = []
            for plan, reader in zip(plans, readers):
                # Augmentation draws from torch's RNG, seeded per micro-batch and step: a batch looks the same
                # whether the epoch ran through or resumed, on any number of ranks. (fork_rng: the caller's RNG
                # is kept.)
                seed = zlib.crc32(f"{self.seed}/{self.epoch}/{plan.micro_batch}/{step}".encode())
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    batches.append(self._collate(reader.step(step), seed))
            yield join_batches(batches)._replace(step=step)

    def _slice(self, worker: int, num_workers: int) -> Iterator[Batch]:
        """Evaluation: this worker's share of this rank's slice, in order, each sample once."""
        items = self._read(worker_pieces(self.pieces(), self.batch_size, worker, num_workers))
        while slots := list(islice(items, self.batch_size)):
            yield self._collate(slots, seed=0)  # evaluation's transforms draw nothing

    def _read(self, pieces: list[Piece]) -> Iterator[tuple[tuple[int, int], dict | None]]:
        """(shard, index) and the raw sample (None: unreadable) of each planned sample; a piece whose samples
        are all kept decoded is not read at all (its raw samples are None: _decode finds them kept)."""
        for piece in pieces:
            keys = [(piece.shard, i) for i in range(piece.start, piece.stop)]
            if self.keep_decoded and all(key in self._decoded for key in keys):
                yield from ((key, None) for key in keys)
            else:
                yield from zip(keys, read_pieces(self.manifest, [piece], self.strict, self.source, self.offsets()))

    def _decode(self, key: tuple[int, int], sample: dict | None) -> tuple[torch.Tensor, int] | None:
        """The decoded image and label, or None for a sample to skip (unreadable or undecodable)."""
        if key in self._decoded:
            kept = self._decoded[key]
            return None if kept is UNDECODABLE else kept
        if sample is None:  # unreadable: read again next epoch, not kept as undecodable
            return None
        decoded = decode_or_skip(sample, self.channels, self.strict, "data.strict", self.decode)
        if self.keep_decoded:
            self._decoded[key] = UNDECODABLE if decoded is None else decoded
        return decoded

    def _collate(self, slots: list[tuple[tuple[int, int], dict | None]], seed: int) -> Batch:
        images, labels, names = [], [], []
        for key, sample in slots:
            if (decoded := self._decode(key, sample)) is None:
                continue
            image, label = decoded
            images.append(self.transform(image) if self.transform else image)
            labels.append(label)
            if self.encoded:  # for the message about an image the training process cannot decode
                names.append(f"{sample.get('__url__')}:{sample.get('__key__')}" if sample else
                             f"{key[1]} of {self.manifest.url(key[0])}")  # kept in memory: its place in the shard
        if self.encoded:  # the training process augments with this batch's seed, as the transform here would
            return Batch(EncodedImages.pack(images, seed, tuple(names)), torch.tensor(labels, dtype=torch.int64),
                         len(slots) - len(images))
        if images:
            self._image_shape = tuple(images[0].shape)
            stacked = torch.stack(images)
        else:  # every sample unreadable: still a batch (of zero images), so the step count stays the same
            stacked = torch.empty((0, *self._image_shape) if self._image_shape else (0,), dtype=torch.uint8)
        return Batch(stacked, torch.tensor(labels, dtype=torch.int64), len(slots) - len(images))
