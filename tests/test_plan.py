"""The per-rank and per-worker split, tested with explicit rank and world size: no process group."""


import pytest

from recog.data.plan import Piece, num_batches, rank_pieces, slice_pieces, worker_pieces

UNEVEN = [384, 384, 232]  # 3 shards: divides by no world size > 1
MANY = [100, 7, 250, 0, 31, 99, 64]  # uneven, with an empty shard


def samples(pieces):
    return [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]


@pytest.mark.parametrize("sizes", [UNEVEN, MANY, [2], [5]])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_split_counts_every_sample_exactly_once(sizes, world):
    per_rank = [samples(rank_pieces(sizes, r, world, shuffle=False)) for r in range(world)]
    everything = [x for s in per_rank for x in s]
    assert sorted(everything) == [(shard, i) for shard, n in enumerate(sizes) for i in range(n)]
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_split_is_deterministic_and_changes_with_epoch():
    a = rank_pieces(MANY, 1, 3, epoch=5, seed=1)
    assert a == rank_pieces(MANY, 1, 3, epoch=5, seed=1)
    assert a != rank_pieces(MANY, 1, 3, epoch=6, seed=1)
    assert a != rank_pieces(MANY, 1, 3, epoch=5, seed=2)


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_workers_split_a_rank_into_whole_batches(workers):
    pieces = rank_pieces(UNEVEN, 0, 2, epoch=1)  # 500 samples
    blocks = [worker_pieces(pieces, 32, w, workers) for w in range(workers)]
    assert [x for block in blocks for x in samples(block)] == samples(pieces)  # in order, nothing lost
    assert sum(num_batches(len(samples(b)), 32) for b in blocks) == num_batches(500, 32)


def test_slice_pieces_crosses_shard_boundaries():
    pieces = [Piece(2, 10, 20), Piece(0, 0, 5)]
    assert slice_pieces(pieces, 8, 13) == [Piece(2, 18, 20), Piece(0, 0, 3)]
    assert slice_pieces(pieces, 15, 15) == []


def test_ranks_without_samples():
    """Fewer training samples than micro-batches: the last ones are empty, and a rank holding only those has none."""
    from recog.data.plan import ranks_without_samples

    assert ranks_without_samples(1, 2, 2) == [1]
    assert ranks_without_samples(1, 1, 1) == [] and ranks_without_samples(2, 2, 2) == []
    assert ranks_without_samples(3, 4, 1) == []  # one rank accumulating 4 micro-batches, 3 of them with a sample
    assert ranks_without_samples(3, 8, 2) == [1]  # micro-batches 4..7 are empty
    assert ranks_without_samples(5, 8, 4) == [3]
