"""Which samples each rank and each data-loader worker reads in an epoch. Pure functions.

An epoch is one pass over every sample listed in the manifest:

1. The shard order is shuffled from (seed, epoch), the same on every rank.
2. The shards, in that order, form one stream of N samples; rank r takes the
   r-th contiguous slice of ceil(N / world_size) samples. When N does not divide,
   the last slice wraps around to the start of the stream, so the first
   `world_size * ceil(N / world_size) - N` samples are read twice in that epoch
   (fewer than world_size samples: nothing is dropped and no rank runs out early).
3. Every rank therefore has the same number of samples, hence the same number
   of batches: ceil(ceil(N / world_size) / batch_size) steps per epoch.
4. A rank's batches are dealt to its data-loader workers in contiguous blocks,
   so each worker reads a few consecutive shard ranges sequentially.

A slice boundary may fall inside a shard: that shard is then read by two ranks,
each taking its own range of samples. For evaluation (`pad=False`) the slices
differ in size by at most one sample and nothing repeats: every test sample is
counted exactly once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard `shard` (an index into the manifest's shard list)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def shard_order(num_shards: int, *, epoch: int, seed: int, shuffle: bool) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def slice_pieces(pieces: Sequence[Piece], start: int, stop: int) -> list[Piece]:
    """Samples [start, stop) of the stream formed by `pieces` one after another."""
    out, offset = [], 0
    for p in pieces:
        lo, hi = max(start, offset), min(stop, offset + len(p))
        if lo < hi:
            out.append(Piece(p.shard, p.start + lo - offset, p.start + hi - offset))
        offset += len(p)
    return out


def samples_per_rank(num_samples: int, world_size: int) -> int:
    return math.ceil(num_samples / world_size)


def rank_pieces(
    shard_sizes: Sequence[int],
    rank: int,
    world_size: int,
    *,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    pad: bool = True,
) -> list[Piece]:
    """The samples rank `rank` reads this epoch (see the module docstring for the rule)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    order = shard_order(len(shard_sizes), epoch=epoch, seed=seed, shuffle=shuffle)
    stream = [Piece(s, 0, shard_sizes[s]) for s in order if shard_sizes[s] > 0]
    total = sum(len(p) for p in stream)
    if total == 0:
        return []
    if not pad:
        base, extra = divmod(total, world_size)
        start = rank * base + min(rank, extra)
        return slice_pieces(stream, start, start + base + (rank < extra))
    per_rank = samples_per_rank(total, world_size)
    pieces, position, needed = [], rank * per_rank % total, per_rank
    while needed:  # past the end of the stream, wrap around to its start
        take = min(needed, total - position)
        pieces += slice_pieces(stream, position, position + take)
        needed, position = needed - take, 0
    return pieces


def num_batches(num_samples: int, batch_size: int, drop_last: bool = False) -> int:
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def worker_pieces(
    pieces: Sequence[Piece], batch_size: int, worker: int, num_workers: int, *, drop_last: bool = False
) -> list[Piece]:
    """Worker `worker`'s contiguous block of whole batches out of a rank's `pieces`."""
    total = sum(len(p) for p in pieces)
    batches = num_batches(total, batch_size, drop_last)
    first, last = worker * batches // num_workers, (worker + 1) * batches // num_workers
    return slice_pieces(pieces, first * batch_size, min(last * batch_size, total))
