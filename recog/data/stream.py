"""Stream batches from WebDataset tar shards, split across ranks and data-loader workers.

Decoding is `recog.data.decode`; the worker processes are `recog.data.loader`.

The split is decided by `recog.data.plan` (pure, tested without processes);
this module only reads what the plan says. Batches are formed from fixed
*slots*: a sample that cannot be read or decoded leaves its slot empty, so a
bad sample makes one batch smaller but never changes the number of batches,
and no rank runs a different number of steps (which would hang DDP).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from itertools import islice

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from recog.data.decode import Decode, decode_sample
from recog.data.gpu_decode import EncodedImages, keep_encoded
from recog.data.loader import Batch, WorkerWarnings
from recog.data.manifest import Manifest
from recog.data.offsets import IndexMismatch, ShardOffsets, read_indexed
from recog.data.plan import Piece, num_batches, rank_pieces, slice_pieces, worker_pieces
from recog.data.source import FetchError, ShardSource
from recog.errors import DataError

log = logging.getLogger(__name__)

MAX_WORKERS = 256  # data-loader workers per process that a mid-epoch position can describe
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

    offsets: where the shards' samples lie (their index): each piece is read in a few large reads. Shards it
    has no layout for, and the rest of a shard that does not match its layout, go through the tar headers.
    Damaged data (a truncated tar, a shard failing its sha256) is skipped and counted unless `strict`; a
    server that stays unreachable stops the run.
    """
    source = source or ShardSource()
    for piece in pieces:
        url, produced = manifest.url(piece.shard), 0
        layout = offsets.of(piece.shard) if offsets else None
        try:
            if layout is not None:
                try:
                    with source.open(url, manifest.shards[piece.shard].sha256) as stream:
                        for sample in read_indexed(stream, url, layout, piece.start, piece.stop):
                            produced += 1
                            yield sample
                except IndexMismatch as e:
                    offsets.drop(piece.shard, url, str(e))
                    layout = None
            if layout is None:
                with source.open(url, manifest.shards[piece.shard].sha256) as stream:
                    files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                    for sample in islice(wds.tariterators.group_by_keys(files), piece.start + produced, piece.stop):
                        produced += 1
                        yield sample
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
        decode: Decode | None = None,  # image bytes -> uint8 C×H×W; None: decode_image
        channels: int = 1,
        train: bool = True,
        seed: int = 0,
        shuffle_block: int = 1000,
        strict: bool = False,
        source: ShardSource | None = None,
        keep_decoded: bool = False,
        encoded: bool = False,  # data.decode=gpu: batches of EncodedImages, undecoded (decode, transform unused)
    ):
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.batch_size, self.transform, self.channels, self.decode = batch_size, transform, channels, decode
        self.encoded = encoded
        if encoded:  # the training process decodes and augments (recog.data.gpu_decode); kept: the bytes
            self.decode, self.transform = keep_encoded, None
        self.train, self.seed, self.shuffle_block, self.strict = train, seed, shuffle_block, strict
        self.source = source or ShardSource()
        # Shared memory, so that persistent workers (in other processes) see set_epoch().
        self._epoch = multiprocessing.RawValue("q", 0)
        self._consumed = multiprocessing.RawArray("q", MAX_WORKERS)
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
            items = shuffled_blocks(self._read(pieces), self.shuffle_block, rng)
        else:
            total = sum(len(p) for p in pieces)
            pieces, skip = slice_pieces(pieces, min(skip, total), total), 0
            items = self._read(pieces)
        items = islice(items, skip, None)  # read, never decoded
        warnings = WorkerWarnings.in_this_worker()
        for index in itertools.count(done):
            if not (slots := list(islice(items, self.batch_size))):
                break
            # Augmentation draws from torch's RNG, seeded per batch: a batch looks the same whether
            # the epoch ran through or resumed just before it. (fork_rng: the caller's RNG is left alone.)
            seed = zlib.crc32(f"{stream_id}/{index}".encode())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                batch = self._collate(slots, seed)
            yield batch._replace(worker=worker, warnings=warnings.take() if warnings else ())

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
        if sample is None:
            return None
        try:
            decoded = decode_sample(sample, self.channels, self.decode)
        except Exception as e:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            if self.strict:
                raise DataError(f"sample {where} could not be decoded ({e}); fix it or set "
                                "data.strict=false.") from e
            log.warning("skipping undecodable sample %s (%s)", where, e)
            decoded = None
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
            stacked = torch.empty((0, *self._image_shape) if self._image_shape else (0,))
        return Batch(stacked, torch.tensor(labels, dtype=torch.int64), len(slots) - len(images))
