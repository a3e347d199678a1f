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


def test_mix_selection_is_a_pure_function_of_seed_epoch_sizes_and_shares():
    """data.mix=[0.5,1] over a folder of shards of 10 and 6 and one of 4: explicit values, then the properties."""
    from recog.data.plan import Mix, share_of

    mix = Mix((0, 0, 1), (0.5, 1.0))
    assert mix.takes([10, 6, 4]) == [8, 4]  # 0.5 x 16, all 4
    assert mix.pieces([10, 6, 4], epoch=0, seed=0) == [[Piece(0, 0, 1), Piece(0, 6, 10)],  # 5: a run wrapping round
                                                       [Piece(1, 0, 2), Piece(1, 5, 6)], [Piece(2, 0, 4)]]
    assert mix.pieces([10, 6, 4], epoch=1, seed=0) == [[Piece(0, 0, 2), Piece(0, 7, 10)],
                                                       [Piece(1, 0, 1), Piece(1, 4, 6)], [Piece(2, 0, 4)]]
    assert [share_of(n, s) for n, s in [(300, 0.2), (5, 0.01), (0, 0.5), (7, 0.5), (9, 1.0)]] == [60, 1, 0, 4, 9]


@pytest.mark.parametrize("seed", [0, 3])
def test_mix_shares_hold_every_epoch_and_the_subsets_move(seed):
    from recog.data.plan import Mix

    sizes = [128, 128, 44, 96, 0, 96, 8]
    mix = Mix((0, 0, 0, 1, 1, 1, 1), (0.2, 1.0))
    assert mix.takes(sizes) == [60, 200] and mix.epoch_samples(sizes) == 260
    chosen = []
    for epoch in range(12):
        pieces = mix.pieces(sizes, epoch=epoch, seed=seed)
        assert pieces == mix.pieces(sizes, epoch=epoch, seed=seed)  # pure
        picked = samples(p for shard in pieces for p in shard)
        assert len(picked) == len(set(picked)) == 260  # no sample twice
        assert sum(shard < 3 for shard, _ in picked) == 60 and sum(shard >= 3 for shard, _ in picked) == 200
        assert all(len(shard) <= 2 for shard in pieces)  # each shard read in at most two runs
        for s in range(3):  # each shard gives its share, within one sample
            assert abs(sum(len(p) for p in pieces[s]) - 0.2 * sizes[s]) < 1
        chosen.append({x for x in picked if x[0] < 3})
    assert all(a != b for a, b in zip(chosen, chosen[1:]))  # a different subset each epoch
    covered = set().union(*chosen)
    assert len(covered) > 0.8 * 300  # 12 epochs of 20 % reach most of day 1 (all but ~(0.8^12) of it on average)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_a_mixed_epoch_is_read_once_on_any_world_size(world):
    from recog.data.plan import MicroBatchPlan, Mix, epoch_steps, rank_micro_batches

    sizes, mix = [128, 128, 44, 96, 96, 8], Mix((0, 0, 0, 1, 1, 1), (0.2, 1.0))
    steps = epoch_steps(mix.epoch_samples(sizes), 4, 16)
    assert steps == 5
    plans = {m: MicroBatchPlan.make(sizes, m, 4, batch_size=16, block=40, epoch=3, seed=1, mix=mix) for m in range(4)}
    read = [x for r in range(world) for m in rank_micro_batches(4, r, world) for s in range(steps)
            for x in plans[m].step_samples(s)]
    want = samples(p for shard in mix.pieces(sizes, epoch=3, seed=1) for p in shard)
    assert sorted(read) == sorted(want)
