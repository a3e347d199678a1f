"""The P×K DistributedBatchSampler, with explicit rank and world size: no process group."""

from collections import Counter

import numpy as np
import pytest

from recog.data.sampler import DistributedBatchSampler
from recog.errors import ConfigError

# 12 classes of uneven size, two of them smaller than K
LABELS = np.repeat(np.arange(12), [40, 3, 25, 60, 1, 18, 33, 9, 50, 12, 27, 44])


def all_ranks(world, epoch=0, p=3, k=4, seed=0):
    samplers = [DistributedBatchSampler(LABELS, p, k, rank=r, world_size=world, seed=seed) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [[sum(micro_batches, []) for _, micro_batches in s] for s in samplers]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_equal_batches_pk_composition_and_disjoint_ranks(world):
    batches = all_ranks(world)
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == max(1, len(LABELS) // (world * 12))
    for step in range(len(batches[0])):
        classes_per_rank = []
        for rank in range(world):
            batch = batches[rank][step]
            counts = Counter(LABELS[batch].tolist())
            assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}  # P classes × K each
            classes_per_rank.append(set(counts))
        if world * 3 <= 12:  # enough classes: the ranks' batches share no class, hence no sample
            assert sum(map(len, classes_per_rank)) == len(set().union(*classes_per_rank))


def test_small_classes_repeat_samples_rather_than_being_skipped():
    batches = all_ranks(1, p=12, k=4)[0]  # every class in every batch
    for batch in batches:
        rare = [i for i in batch if LABELS[i] == 4]  # a class with 1 sample
        assert len(rare) == 4 and len(set(rare)) == 1


def test_samples_of_a_class_are_used_before_any_repeats():
    batches = all_ranks(1, p=1, k=4)[0]
    seen = Counter(i for b in batches for i in b)
    big = np.flatnonzero(LABELS == 3)  # 60 samples
    taken = [seen[i] for i in big]
    assert max(taken) - min(taken) <= 1  # a class's queue is exhausted before it is reshuffled


def test_deterministic_and_changes_with_epoch_and_seed():
    assert all_ranks(2, epoch=1) == all_ranks(2, epoch=1)
    assert all_ranks(2, epoch=1) != all_ranks(2, epoch=2)
    assert all_ranks(2, epoch=1, seed=1) != all_ranks(2, epoch=1, seed=2)


def test_resume_mid_epoch_gives_exactly_the_remaining_batches():
    full = DistributedBatchSampler(LABELS, 3, 4, rank=1, world_size=2, seed=5)
    full.set_epoch(3)
    expected = list(full)
    resumed = DistributedBatchSampler(LABELS, 3, 4, rank=1, world_size=2, seed=5)
    resumed.set_epoch(3, [[0, 4]])
    assert expected[:4] + list(resumed) == expected and [step for step, _ in expected] == list(range(len(full)))


def test_bad_arguments():
    with pytest.raises(ConfigError):
        DistributedBatchSampler(LABELS, 0, 4)
    with pytest.raises(ConfigError):
        DistributedBatchSampler([], 2, 2)
