"""One rank's samples for `python -m recog.embed`, cut into parts and read in data-loader workers.

The rank's samples are the evaluation split (`plan.rank_pieces`, no shuffle): every
sample of the shards on exactly one rank, in the shards' order. They are cut into parts of `part_size`
consecutive *slots* (planned samples, readable or not): a part covers the same samples whatever was
written before, so a restarted run knows which samples the parts on disk hold and reads only the others.
A batch never spans two parts, so a part's batches, hence its vectors, are the same in a restarted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from recog.data.decode import decode_or_skip
from recog.data.loader import WorkerWarnings
from recog.data.manifest import Manifest
from recog.data.offsets import ShardOffsets
from recog.data.plan import Piece, slice_pieces
from recog.data.source import ShardSource
from recog.data.stream import read_pieces


@dataclass(frozen=True)
class Part:
    """Slots [start, stop) of a rank's samples."""

    number: int
    start: int
    stop: int


def rank_parts(num_samples: int, part_size: int) -> list[Part]:
    """A rank's `num_samples` slots in parts of `part_size` (the last one shorter)."""
    return [Part(n, lo, min(lo + part_size, num_samples)) for n, lo in enumerate(range(0, num_samples, part_size))]


def worker_parts(parts: Sequence[Part], worker: int, num_workers: int) -> list[Part]:
    """Worker `worker`'s contiguous block of the parts: it reads its shards' ranges from start to end once."""
    return list(parts[worker * len(parts) // num_workers : (worker + 1) * len(parts) // num_workers])


def consecutive_runs(parts: Sequence[Part]) -> Iterator[list[Part]]:
    """Parts grouped into runs of adjacent slots (read as one stream: a shard is opened once per run)."""
    run: list[Part] = []
    for part in parts:
        if run and part.start != run[-1].stop:
            yield run
            run = []
        run.append(part)
    if run:
        yield run


class PartBatch(NamedTuple):
    part: int  # the part's number
    last: bool  # the part's last batch: once it is embedded, the part is complete
    images: torch.Tensor  # (n, C, S, S) uint8, preprocessed
    keys: np.ndarray  # (n,) str: the samples' keys in their shards
    labels: torch.Tensor  # (n,) int64; -1: the sample has no label
    skipped: int  # slots of this batch whose sample could not be read or decoded
    warnings: tuple[str, ...] = ()  # logged in the data-loader worker since its last batch


class PartStream(IterableDataset):
    """The batches of `parts` of one rank's samples (`pieces`); each data-loader worker reads a block of parts."""

    def __init__(self, manifest: Manifest, pieces: list[Piece], parts: list[Part], *, batch_size: int,
                 preprocess: Callable[[torch.Tensor], torch.Tensor], channels: int, strict: bool,
                 source: ShardSource | None = None):
        self.manifest, self.pieces, self.parts = manifest, pieces, parts
        self.batch_size, self.preprocess, self.channels = batch_size, preprocess, channels
        self.strict, self.source = strict, source or ShardSource()

    def __iter__(self) -> Iterator[PartBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        warnings = WorkerWarnings.in_this_worker()
        offsets = ShardOffsets.load(self.manifest, self.source)
        for run in consecutive_runs(worker_parts(self.parts, worker, num_workers)):
            slots = read_pieces(self.manifest, slice_pieces(self.pieces, run[0].start, run[-1].stop), self.strict,
                                self.source, offsets)
            for part in run:
                for lo in range(part.start, part.stop, self.batch_size):
                    hi = min(lo + self.batch_size, part.stop)
                    batch = self._collate(islice(slots, hi - lo), part.number, hi == part.stop)
                    yield batch._replace(warnings=warnings.take() if warnings else ())

    def _collate(self, slots, part: int, last: bool) -> PartBatch:
        images, keys, labels, skipped = [], [], [], 0
        for sample in slots:
            # as training skips them; a sample without a label is embedded with label -1 (a gallery may hold it)
            decoded = decode_or_skip(sample, self.channels, self.strict, "strict", unlabelled=-1)
            if decoded is None:
                skipped += 1
                continue
            image, label = decoded
            images.append(self.preprocess(image))
            keys.append(sample["__key__"])
            labels.append(label)
        stacked = torch.stack(images) if images else torch.empty((0, self.channels, 0, 0), dtype=torch.uint8)
        return PartBatch(part, last, stacked, np.asarray(keys, dtype=str), torch.tensor(labels, dtype=torch.int64),
                         skipped)
