"""A training micro-batch read sample by sample (shards read by their index, photos): the batches reading whole
blocks gives, from only the samples of the worker's own steps, each shard opened once per run of its pieces."""

import random
from dataclasses import dataclass

import pytest
import torch

from recog.data import stream as stream_module
from recog.data.manifest import load_manifest
from recog.data.offsets import ShardOffsets
from recog.data.plan import MicroBatchPlan, Piece, epoch_steps, pick, worker_steps
from recog.data.source import ShardSource
from recog.data.stream import MicroBatchReader, ShardStream, by_sample, read_pieces


def test_pick_gives_the_samples_at_the_positions_in_merged_pieces():
    pieces = [Piece(3, 10, 14), Piece(1, 0, 3)]
    assert pick(pieces, [0, 1, 3, 4, 6]) == [Piece(3, 10, 12), Piece(3, 13, 14), Piece(1, 0, 1), Piece(1, 2, 3)]
    assert pick(pieces, []) == []
    assert pick(pieces, range(7)) == pieces
    stream = [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]
    rng = random.Random(0)
    for _ in range(50):
        positions = sorted(rng.sample(range(7), rng.randrange(8)))
        picked = [(p.shard, i) for p in pick(pieces, positions) for i in range(p.start, p.stop)]
        assert picked == [stream[i] for i in positions]


def counted(manifest, offsets, tally):
    """read_pieces, counting each sample it yields into tally[0]."""
    def read(pieces):
        for sample in read_pieces(manifest, pieces, True, offsets=offsets):
            tally[0] += 1
            yield sample
    return read


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_reading_by_sample_gives_the_batches_of_block_reading_from_only_the_workers_samples(tiny_data, workers):
    manifest = load_manifest(tiny_data["train"])  # 1,000 samples in shards of 384, 384, 232
    offsets = ShardOffsets.load(manifest, ShardSource())
    steps = epoch_steps(manifest.num_samples, 2, 32)  # 16
    block_read_more = False
    for micro_batch in range(2):
        plan = MicroBatchPlan.make(manifest.shard_sizes, micro_batch, 2, batch_size=32, block=200, epoch=1, seed=4)
        for worker in range(workers):
            mine = worker_steps(steps, worker, workers)
            batches, reads = {}, {}
            for sample_by_sample in (False, True):
                tally = [0]
                reader = MicroBatchReader(plan, mine, counted(manifest, offsets, tally), sample_by_sample)
                batches[sample_by_sample] = [[(s["__key__"], s["png"], s["cls"]) for s in reader.step(step)]
                                             for step in mine]
                reads[sample_by_sample] = tally[0]
            assert batches[True] == batches[False]
            assert [len(b) for b in batches[True]] == [len(plan.step_samples(step)) for step in mine]
            assert reads[True] == sum(map(len, batches[True]))  # nothing read that no step of this worker takes
            block_read_more |= reads[False] > reads[True]
    assert block_read_more == (workers > 1)  # blocks of 224 samples (7 batches) shared by two workers


def test_by_sample_only_for_indexed_shards_of_images_read_one_by_one(tiny_data, tmp_path, monkeypatch):
    manifest = load_manifest(tiny_data["train"])
    offsets = ShardOffsets.load(manifest, ShardSource())
    pieces = [Piece(0, 0, 384), Piece(2, 5, 10)]
    assert not by_sample(offsets, pieces)  # 28-pixel PNGs: a block is read in a few large reads
    monkeypatch.setattr(stream_module, "ON_ITS_OWN", 1)
    assert by_sample(offsets, pieces)
    assert not by_sample(ShardOffsets({}), pieces)  # shards without an index: through their tar headers


@dataclass(frozen=True)
class CountingSource(ShardSource):
    opened: list = None  # the URLs opened

    def open(self, url: str, sha256: str = ""):
        self.opened.append(url)
        return super().open(url, sha256)


def test_a_run_of_pieces_of_one_shard_is_read_through_one_open_file(tiny_data):
    manifest = load_manifest(tiny_data["train"])
    offsets = ShardOffsets.load(manifest, ShardSource())
    pieces = [Piece(1, 3, 4), Piece(1, 7, 9), Piece(1, 300, 301), Piece(0, 2, 3), Piece(1, 0, 1)]
    source = CountingSource(opened=[])
    indexed = list(read_pieces(manifest, pieces, True, source, offsets))
    assert indexed == list(read_pieces(manifest, pieces, strict=True))  # what the tar headers give
    assert source.opened == [manifest.url(1), manifest.url(0), manifest.url(1)]


@pytest.mark.parametrize("world", [1, 2])
def test_training_batches_are_the_same_read_by_sample(tiny_data, monkeypatch, world):
    """The whole training path (ShardStream, explicit rank and worker): by_sample changes how, not what."""
    manifest = load_manifest(tiny_data["train"])

    def epoch(rank, worker):
        stream = ShardStream(manifest, rank=rank, world_size=world, batch_size=32, seed=7, shuffle_block=100)
        stream.set_epoch(2)
        return list(stream._steps(worker, 2))

    before = {(r, w): epoch(r, w) for r in range(world) for w in range(2)}
    monkeypatch.setattr(stream_module, "ON_ITS_OWN", 1)  # every image "large": read sample by sample
    for (rank, worker), batches in before.items():
        after = epoch(rank, worker)
        assert [b.step for b in after] == [b.step for b in batches] and len(after) > 0
        for a, b in zip(after, batches, strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
