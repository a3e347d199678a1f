"""The per-rank and per-worker split, tested with explicit rank and world size: no process group."""

from collections import Counter

import pytest

from recog.data.plan import Piece, num_batches, rank_pieces, samples_per_rank, slice_pieces, worker_pieces

UNEVEN = [384, 384, 232]  # 3 shards: divides by no world size > 1
MANY = [100, 7, 250, 0, 31, 99, 64]  # uneven, with an empty shard


def samples(pieces):
    return [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]


@pytest.mark.parametrize("sizes", [UNEVEN, MANY, [5]])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_split_covers_everything_with_equal_steps(sizes, world):
    total = sum(sizes)
    per_rank = [samples(rank_pieces(sizes, r, world, epoch=3, seed=7)) for r in range(world)]
    # every rank gets the same number of samples, hence the same number of steps
    assert {len(s) for s in per_rank} == {samples_per_rank(total, world)}
    assert len({num_batches(len(s), 32) for s in per_rank}) == 1
    # nothing is dropped: every sample of every shard is read this epoch
    seen = Counter(x for s in per_rank for x in s)
    assert set(seen) == {(shard, i) for shard, n in enumerate(sizes) for i in range(n)}
    # ranks overlap only in the padding: fewer than world_size samples are read twice
    repeats = sum(c - 1 for c in seen.values())
    assert repeats == world * samples_per_rank(total, world) - total < world


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_are_disjoint_apart_from_padding(world):
    per_rank = [set(samples(rank_pieces(UNEVEN, r, world, epoch=0, seed=0))) for r in range(world)]
    overlap = sum(len(a & b) for i, a in enumerate(per_rank) for b in per_rank[i + 1:])
    assert overlap == world * samples_per_rank(sum(UNEVEN), world) - sum(UNEVEN)


@pytest.mark.parametrize("sizes", [UNEVEN, MANY, [2]])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_split_counts_every_sample_exactly_once(sizes, world):
    per_rank = [samples(rank_pieces(sizes, r, world, shuffle=False, pad=False)) for r in range(world)]
    everything = [x for s in per_rank for x in s]
    assert sorted(everything) == [(shard, i) for shard, n in enumerate(sizes) for i in range(n)]
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_split_is_deterministic_and_changes_with_epoch():
    a = rank_pieces(MANY, 1, 3, epoch=5, seed=1)
    assert a == rank_pieces(MANY, 1, 3, epoch=5, seed=1)
    assert a != rank_pieces(MANY, 1, 3, epoch=6, seed=1)
    assert a != rank_pieces(MANY, 1, 3, epoch=5, seed=2)


def test_more_ranks_than_samples_still_gives_every_rank_a_sample():
    per_rank = [samples(rank_pieces([3], r, 8)) for r in range(8)]
    assert all(len(s) == 1 for s in per_rank)
    assert {x for s in per_rank for x in s} == {(0, 0), (0, 1), (0, 2)}


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_workers_split_a_rank_into_whole_batches(workers):
    pieces = rank_pieces(UNEVEN, 0, 2, epoch=1)  # 500 samples
    parts = [worker_pieces(pieces, 32, w, workers) for w in range(workers)]
    assert [x for part in parts for x in samples(part)] == samples(pieces)  # in order, nothing lost
    assert sum(num_batches(len(samples(p)), 32) for p in parts) == num_batches(500, 32)


def test_slice_pieces_crosses_shard_boundaries():
    pieces = [Piece(2, 10, 20), Piece(0, 0, 5)]
    assert slice_pieces(pieces, 8, 13) == [Piece(2, 18, 20), Piece(0, 0, 3)]
    assert slice_pieces(pieces, 15, 15) == []


def test_ranks_without_samples():
    """Fewer training samples than parts: the last parts are empty, and a rank holding only those has none."""
    from recog.data.plan import ranks_without_samples

    assert ranks_without_samples(1, 2, 2) == [1]
    assert ranks_without_samples(1, 1, 1) == [] and ranks_without_samples(2, 2, 2) == []
    assert ranks_without_samples(3, 4, 1) == []  # one rank accumulating 4 parts, 3 of them with a sample
    assert ranks_without_samples(3, 8, 2) == [1]  # parts 4..7 are empty
    assert ranks_without_samples(5, 8, 4) == [3]
