"""Which samples each rank and each data-loader worker reads in an epoch. Pure functions.

Training epochs (`MicroBatchPlan`, `rank_micro_batches`, `worker_steps`) do not depend on the world size: a
step's global batch is cut into `micro_batches` forward passes (global batch / batch size, fixed for a run),
and an epoch's shard stream into as many contiguous stretches, one per micro-batch; each step takes one batch
from every stretch. Which micro-batch a sample lands in, in which step, and how it is augmented, follow from
(seed, epoch, micro-batch, step) alone; the world size only decides which rank reads which micro-batches
(`rank_micro_batches`), and the loader workers which steps (`worker_steps`). So a run resumed on another
number of ranks continues the same epoch with every remaining sample seen exactly once, in the same global
batches. Each micro-batch's stretch is shuffled in blocks of `block` samples (a multiple of the batch size, so
that no batch straddles two blocks) and read sequentially, a block at a time, or, where the shards' index makes
that cheap (photos), each step's samples on their own (`pick`): the same batches either way.

Evaluation (`rank_pieces`) splits the stream among the ranks directly: the shards, in their order (training
shuffles it from seed and epoch), form one stream, and rank r takes its r-th contiguous slice. The slices
differ in size by at most one sample and nothing repeats: every test sample is counted exactly once. A slice
boundary may fall inside a shard: that shard is then read by two ranks, each taking its own range of samples.
A rank's batches are dealt to its data-loader workers in contiguous blocks (`worker_pieces`), so each worker
reads a few consecutive shard ranges sequentially.

Replay (`Mix`, data.mix): a training epoch may read only a share of some folders of a union. Which samples is a
pure function of (seed, epoch, sizes, shares): each folder gives the same number of samples every epoch (so an
epoch has the same steps), spread over its shards in proportion to their sizes, each shard's part one run of
consecutive samples (read sequentially) that starts at a seeded place and wraps around the shard's end. The
runs move every epoch: a different subset each time, every sample equally likely to be in it. The epoch's
stream is then the selected runs, shard by shard in the shuffled shard order, and the plan goes on as above.
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


def pick(pieces: Sequence[Piece], positions: Sequence[int]) -> list[Piece]:
    """The samples at `positions` (increasing; 0 is the first sample of the stream formed by `pieces`) as pieces in
    stream order, neighbours in one shard merged into one piece."""
    out: list[Piece] = []
    ends, offset = [], 0
    for p in pieces:
        offset += len(p)
        ends.append(offset)
    k = 0
    for position in positions:
        while ends[k] <= position:
            k += 1
        shard, index = pieces[k].shard, pieces[k].start + position - (ends[k] - len(pieces[k]))
        if out and out[-1].shard == shard and out[-1].stop == index:
            out[-1] = Piece(shard, out[-1].start, index + 1)
        else:
            out.append(Piece(shard, index, index + 1))
    return out


def samples_per_rank(num_samples: int, world_size: int) -> int:
    return math.ceil(num_samples / world_size)


def share_of(samples: int, share: float) -> int:
    """The samples an epoch takes of a folder of `samples` at `share` (0 < share <= 1): rounded half up, at least
    one of a non-empty folder."""
    if share >= 1 or samples == 0:
        return samples
    return min(samples, max(1, math.floor(share * samples + 0.5)))


@dataclass(frozen=True)
class Mix:
    """data.mix: the share of each folder of a union that each training epoch reads (see the module docstring)."""

    folders: tuple[int, ...]  # each shard's folder (its position in data.train), one per shard
    shares: tuple[float, ...]  # each folder's share, in (0, 1]

    def folder_samples(self, shard_sizes: Sequence[int]) -> list[int]:
        """Each folder's samples."""
        samples = [0] * len(self.shares)
        for folder, size in zip(self.folders, shard_sizes):
            samples[folder] += size
        return samples

    def takes(self, shard_sizes: Sequence[int]) -> list[int]:
        """The samples each epoch reads of each folder: the same every epoch."""
        return [share_of(n, share) for n, share in zip(self.folder_samples(shard_sizes), self.shares)]

    def epoch_samples(self, shard_sizes: Sequence[int]) -> int:
        return sum(self.takes(shard_sizes))

    def pieces(self, shard_sizes: Sequence[int], *, epoch: int, seed: int) -> list[list[Piece]]:
        """For each shard, the runs of its samples that epoch `epoch` reads, in the shard's order."""
        quotas = list(shard_sizes)
        for folder, (share, take) in enumerate(zip(self.shares, self.takes(shard_sizes))):
            if share >= 1:
                continue
            mine = [s for s, f in enumerate(self.folders) if f == folder]
            for s in mine:  # in proportion to the shard's size, rounded down ...
                quotas[s] = math.floor(share * shard_sizes[s])
            # ... and the samples that rounding left over, one each to shards drawn from seed and epoch
            rng = random.Random(f"mix/{seed}/{epoch}/{folder}")
            fillable = [s for s in mine if quotas[s] < shard_sizes[s]]
            for s in rng.sample(fillable, take - sum(quotas[s] for s in mine)):
                quotas[s] += 1
        return [window(size, quota, random.Random(f"mix/{seed}/{epoch}/shard/{shard}"), shard)
                for shard, (size, quota) in enumerate(zip(shard_sizes, quotas))]


def window(size: int, length: int, rng: random.Random, shard: int) -> list[Piece]:
    """`length` consecutive samples of a shard of `size`, from a place drawn by `rng`, wrapping around its end:
    one piece, or two in the shard's order ([0, w) and [start, size)). Every sample is in it with the same
    chance, length / size."""
    if length >= size:
        return [Piece(shard, 0, size)] if size else []
    if length == 0:
        return []
    start = rng.randrange(size)
    if start + length <= size:
        return [Piece(shard, start, start + length)]
    return [Piece(shard, 0, start + length - size), Piece(shard, start, size)]


def epoch_samples(shard_sizes: Sequence[int], mix: Mix | None) -> int:
    """The samples of a training epoch: all of them, or what `mix` takes of each folder."""
    return mix.epoch_samples(shard_sizes) if mix else sum(shard_sizes)


def rank_pieces(shard_sizes: Sequence[int], rank: int, world_size: int, *, epoch: int = 0, seed: int = 0,
                shuffle: bool = True, mix: Mix | None = None) -> list[Piece]:
    """Rank `rank`'s contiguous slice of the epoch's stream (see the module docstring): the slices differ in
    size by at most one sample, and nothing repeats. `mix`: the epoch reads only its runs of each shard."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    order = shard_order(len(shard_sizes), epoch=epoch, seed=seed, shuffle=shuffle)
    if mix is None:
        stream = [Piece(s, 0, shard_sizes[s]) for s in order if shard_sizes[s] > 0]
    else:
        selected = mix.pieces(shard_sizes, epoch=epoch, seed=seed)
        stream = [p for s in order for p in selected[s]]
    base, extra = divmod(sum(len(p) for p in stream), world_size)
    start = rank * base + min(rank, extra)
    return slice_pieces(stream, start, start + base + (rank < extra))


def rank_micro_batches(micro_batches: int, rank: int, world_size: int) -> range:
    """The micro-batches that rank `rank` reads at every step: a contiguous run of them (neighbouring ones are
    neighbouring stretches of the stream), as even as the numbers allow; none if world_size > micro_batches."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return range(rank * micro_batches // world_size, (rank + 1) * micro_batches // world_size)


def ranks_without_samples(num_samples: int, micro_batches: int, world_size: int) -> list[int]:
    """The ranks none of whose micro-batches holds a sample of a training epoch. Their stretches differ by at most
    one sample, so with fewer samples than micro-batches the last `micro_batches - num_samples` are empty, and a
    rank holding only those would have nothing to train on from its first step."""
    return [rank for rank in range(world_size)
            if all(m >= num_samples for m in rank_micro_batches(micro_batches, rank, world_size))]


def epoch_steps(num_samples: int, micro_batches: int, batch_size: int) -> int:
    """Steps of a training epoch: the batches of the largest micro-batch's stretch (they differ by at most one
    sample)."""
    return max(1, num_batches(samples_per_rank(num_samples, micro_batches), batch_size))


def shuffle_block(block: int, batch_size: int) -> int:
    """`block` rounded up to a whole number of batches."""
    return max(1, math.ceil(block / batch_size)) * batch_size


@dataclass(frozen=True)
class MicroBatchPlan:
    """Micro-batch `micro_batch` of `micro_batches` of a training epoch: its stretch of the shard stream
    (`pieces`), shuffled in blocks of `block` samples, cut into batches of `batch_size`, one a step. Steps past
    its end have empty batches."""

    pieces: tuple[Piece, ...]
    micro_batch: int
    batch_size: int
    block: int
    key: str  # the shuffle's seed: "seed/epoch"

    @classmethod
    def make(cls, shard_sizes: Sequence[int], micro_batch: int, micro_batches: int, *, batch_size: int, block: int,
             epoch: int, seed: int, mix: Mix | None = None) -> MicroBatchPlan:
        pieces = rank_pieces(shard_sizes, micro_batch, micro_batches, epoch=epoch, seed=seed, shuffle=True, mix=mix)
        return cls(tuple(pieces), micro_batch, batch_size, shuffle_block(block, batch_size), f"{seed}/{epoch}")

    def __len__(self) -> int:
        return sum(len(p) for p in self.pieces)

    def block_of(self, step: int) -> int:
        return step * self.batch_size // self.block

    def block_pieces(self, first: int, last: int) -> list[Piece]:
        """The stretch holding blocks first..last (inclusive), in stream order."""
        return slice_pieces(self.pieces, first * self.block, min((last + 1) * self.block, len(self)))

    def block_length(self, block: int) -> int:
        return max(0, min(self.block, len(self) - block * self.block))

    def block_order(self, block: int) -> list[int]:
        """Block `block`'s positions (0 = its first sample in the stream) in shuffled order."""
        order = list(range(self.block_length(block)))
        random.Random(f"samples/{self.key}/{self.micro_batch}/{block}").shuffle(order)
        return order

    def step_slice(self, step: int) -> slice:
        """Where step `step`'s batch lies within its block's shuffled order."""
        start = step * self.batch_size - self.block_of(step) * self.block
        return slice(start, start + self.batch_size)

    def step_samples(self, step: int) -> list[tuple[int, int]]:
        """(shard, index in shard) of the samples of step `step`'s batch (what a reader yields, for tests)."""
        block = self.block_of(step)
        stream = [(p.shard, i) for p in self.block_pieces(block, block) for i in range(p.start, p.stop)]
        return [stream[i] for i in self.block_order(block)[self.step_slice(step)]]


def worker_steps(steps: int, worker: int, num_workers: int, done: Sequence[Sequence[int]] = ()) -> list[int]:
    """The steps data-loader worker `worker` makes: a contiguous block of the epoch's steps (the workers read
    apart, each its own stretch of every micro-batch), less those trained on already (`done`: [start, stop) ranges).

    The loader takes one step from each worker in turn, so the training order interleaves the blocks. After
    `len(done)` steps the next one is due from block `len(done) % num_workers`: a resumed loader, which starts
    again from its worker 0, gives that block to worker 0 (and so on around), and so continues in the order the
    uninterrupted epoch had. Every rank's worker w makes the same steps: every rank gets the same step at once."""
    rotate = count_done(done) % num_workers
    block = (worker + rotate) % num_workers
    return [s for s in range(block * steps // num_workers, (block + 1) * steps // num_workers)
            if not is_done(done, s)]


def is_done(done: Sequence[Sequence[int]], step: int) -> bool:
    return any(start <= step < stop for start, stop in done)


def mark_done(done: Sequence[Sequence[int]], step: int) -> list[list[int]]:
    """`done` with `step` added, as sorted, merged [start, stop) ranges (what a checkpoint records)."""
    ranges = sorted([list(r) for r in done] + [[step, step + 1]])
    merged: list[list[int]] = []
    for start, stop in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def count_done(done: Sequence[Sequence[int]]) -> int:
    return sum(stop - start for start, stop in done)


def num_batches(num_samples: int, batch_size: int) -> int:
    """Batches of `batch_size` holding `num_samples`, the last one short."""
    return math.ceil(num_samples / batch_size)


def worker_pieces(pieces: Sequence[Piece], batch_size: int, worker: int, num_workers: int) -> list[Piece]:
    """Worker `worker`'s contiguous block of whole batches out of a rank's `pieces`."""
    total = sum(len(p) for p in pieces)
    batches = num_batches(total, batch_size)
    first, last = worker * batches // num_workers, (worker + 1) * batches // num_workers
    return slice_pieces(pieces, first * batch_size, min(last * batch_size, total))
