"""Epochs that do not depend on the world size (recog.data.plan's micro-batches and steps, the P×K sampler's schedule),
tested with explicit ranks and loader workers: no processes. A run stopped after any step and continued on
another number of ranks, or of loader workers, sees every sample of the epoch exactly once."""

from collections import Counter

import numpy as np
import pytest

from recog.data.plan import MicroBatchPlan, epoch_steps, mark_done, rank_micro_batches, worker_steps
from recog.data.sampler import DistributedBatchSampler

SIZES = [100, 7, 250, 0, 31, 99, 64]  # 551 samples in uneven shards, one empty
MICRO_BATCHES, BATCH, BLOCK = 4, 16, 40  # global batch 64; shuffle blocks of 48 (40 rounded up to whole batches)


def loader_order(steps: int, workers: int, done=()) -> list[int]:
    """The steps in the order a DataLoader hands them over: one from each worker in turn, skipping workers
    that have run out (torch's round robin over iterable-dataset workers)."""
    queues = [worker_steps(steps, w, workers, done) for w in range(workers)]
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def step_samples(epoch: int, step: int, world: int) -> list[tuple[int, int]]:
    """Step `step`'s global batch as the ranks of `world` read it: each rank its micro-batches, ranks in order."""
    plans = {m: MicroBatchPlan.make(SIZES, m, MICRO_BATCHES, batch_size=BATCH, block=BLOCK, epoch=epoch, seed=3)
             for m in range(MICRO_BATCHES)}
    return [x for rank in range(world) for m in rank_micro_batches(MICRO_BATCHES, rank, world)
            for x in plans[m].step_samples(step)]


def everything() -> Counter:
    return Counter((shard, i) for shard, n in enumerate(SIZES) for i in range(n))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_world_size_reads_the_same_global_batches_each_sample_once(world):
    steps = epoch_steps(sum(SIZES), MICRO_BATCHES, BATCH)
    assert steps == 9  # ceil(ceil(551 / 4) / 16)
    read = sorted(m for r in range(world) for m in rank_micro_batches(MICRO_BATCHES, r, world))
    assert read == list(range(MICRO_BATCHES))
    batches = [step_samples(1, s, world) for s in range(steps)]
    assert batches == [step_samples(1, s, 4) for s in range(steps)]  # world size 4, one micro-batch per rank
    assert Counter(x for b in batches for x in b) == everything()


@pytest.mark.parametrize("before, after", [(1, 4), (4, 1), (2, 3), (3, 2), (4, 2)])
@pytest.mark.parametrize("workers_before, workers_after", [(2, 2), (1, 3), (3, 2)])
@pytest.mark.parametrize("stop_after", [0, 1, 4, 8])
def test_a_new_world_size_mid_epoch_reads_each_remaining_sample_once(before, after, workers_before,
                                                                      workers_after, stop_after):
    steps = epoch_steps(sum(SIZES), MICRO_BATCHES, BATCH)
    first = loader_order(steps, workers_before)[:stop_after]
    done = []
    for step in first:
        done = mark_done(done, step)
    rest = loader_order(steps, workers_after, done)
    assert sorted(first + rest) == list(range(steps))  # every step once
    seen = Counter(x for s in first for x in step_samples(2, s, before))
    seen += Counter(x for s in rest for x in step_samples(2, s, after))
    assert seen == everything()  # every sample once
    if workers_after == workers_before:  # the same workers: the uninterrupted epoch's order, step for step
        assert first + rest == loader_order(steps, workers_before)


def test_a_short_last_step_and_the_shuffle():
    plans = [MicroBatchPlan.make(SIZES, m, MICRO_BATCHES, batch_size=BATCH, block=BLOCK, epoch=0, seed=3)
             for m in range(MICRO_BATCHES)]
    assert [len(p) for p in plans] == [138, 138, 138, 137]
    assert [len(plans[0].step_samples(s)) for s in range(9)] == [16] * 8 + [10]
    in_order = [(p.shard, i) for piece in plans[0].pieces for p in [piece] for i in range(p.start, p.stop)]
    first_block = [x for s in range(3) for x in plans[0].step_samples(s)]
    assert sorted(first_block) == sorted(in_order[:48]) and first_block != in_order[:48]  # shuffled in its block


LABELS = np.repeat(np.arange(12), [40, 3, 25, 60, 1, 18, 33, 9, 50, 12, 27, 44])


def pk_steps(world: int, done=(), micro_batches=4) -> dict[int, list[int]]:
    """Each step not in `done` as the ranks of `world` make it: their indices, ranks in order."""
    out: dict[int, list[int]] = {}
    for rank in range(world):
        sampler = DistributedBatchSampler(LABELS, 3, 2, rank=rank, world_size=world, seed=1,
                                          micro_batches=micro_batches)
        sampler.set_epoch(5, done)
        for step, micro_batch_indices in sampler:
            out.setdefault(step, []).extend(i for indices in micro_batch_indices for i in indices)
    return out


@pytest.mark.parametrize("before, after", [(1, 4), (4, 1), (2, 3), (3, 2)])
@pytest.mark.parametrize("stop_after", [0, 3, 7])
def test_pk_batches_continue_on_a_new_world_size(before, after, stop_after):
    reference = pk_steps(4)
    assert len(reference) == len(LABELS) // (4 * 3 * 2) == 13
    first = dict(list(pk_steps(before).items())[:stop_after])
    done = []
    for step in first:
        done = mark_done(done, step)
    rest = pk_steps(after, done)
    assert sorted([*first, *rest]) == list(range(13))
    assert {**first, **rest} == reference  # the same P×K batches in every step


def settings(**kw):
    from omegaconf import OmegaConf

    return OmegaConf.create({"batch_size": 16, "accumulate": 1, "global_batch": None, "sampler": {"name": "stream"},
                             "loss": {"cross_rank": False}, **kw})


def test_the_global_batch_is_kept_across_world_sizes_where_it_can_be(caplog):
    from recog.config import global_batch_micro_batches
    from recog.errors import ConfigError

    assert global_batch_micro_batches(settings(), 2) == (32, 2)  # batch_size x world size
    assert global_batch_micro_batches(settings(), 1, saved={"global_batch": 64}) == (64, 4)  # a restart keeps its own
    assert global_batch_micro_batches(settings(global_batch=128), 1, saved={"global_batch": 64}) == (128, 8)
    # a restart on more processes than the checkpoint's micro-batches: this run's own, said once
    assert global_batch_micro_batches(settings(), 8, saved={"global_batch": 64}) == (128, 8)
    assert "cannot be split" in caplog.text
    with pytest.raises(ConfigError, match="global_batch=40 is not a multiple of batch_size=16"):
        global_batch_micro_batches(settings(global_batch=40), 1)
    with pytest.raises(ConfigError, match="fewer than the 4 processes"):
        global_batch_micro_batches(settings(global_batch=32), 4)
    with pytest.raises(ConfigError, match="loss.cross_rank=true"):
        global_batch_micro_batches(settings(global_batch=64, loss={"cross_rank": True}), 2)
