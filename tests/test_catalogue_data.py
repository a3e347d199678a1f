"""A data set of several shard folders (issue 29): classes united by name, each folder's labels mapped when read,
and replay (data.mix). Day folders are real shards cut from the bundled Fashion-MNIST subset."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import BUNDLED, run_train, tiny_args

from recog.build import check_resumed_data
from recog.config import check_against_data, check_config, data_mix, folders_line
from recog.data.__main__ import main as data_cli
from recog.data.idx import find_idx_pair
from recog.data.loader import make_loader
from recog.data.manifest import into_classes, load_manifest, load_manifests
from recog.data.offsets import ShardOffsets
from recog.data.plan import Mix, Piece, mark_done
from recog.data.random_access import ShardRandomAccess
from recog.data.source import ShardSource
from recog.data.stream import ShardStream, read_pieces
from recog.data.write import FASHION_MNIST_CLASSES, idx_records, write_shards
from recog.errors import ConfigError
from recog.rundir import compose_train_config

NAMES = FASHION_MNIST_CLASSES
DAY1 = [0, 1, 2, 3, 4, 5, 6]  # 7 of the 10 classes, in label order
DAY2 = [9, 3, 7, 0, 8]  # the 3 others and 2 old ones, in another order


def day_folder(out, split: str, classes: list[int], count: int, shard_samples: int, skip: int = 0):
    """Shards of the first `count` images (after `skip`) of `split` whose class is one of `classes`, labelled by
    their position in `classes` (the folder's own class list)."""
    records, _ = idx_records(*find_idx_pair(BUNDLED, split), NAMES)
    chosen = [r for r in records[skip:] if r.label in classes][:count]
    local = [replace(r, label=classes.index(r.label)) for r in chosen]
    return write_shards(local, [NAMES[c] for c in classes], out, prefix=split, shard_samples=shard_samples,
                        progress=False)


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    root = tmp_path_factory.mktemp("days")
    day_folder(root / "day1", "train", DAY1, 300, 128)  # shards of 128, 128, 44
    day_folder(root / "day2", "train", DAY2, 200, 96, skip=5000)  # 96, 96, 8: other images than day 1's
    day_folder(root / "test_sub", "test", [5, 2], 60, 32)  # 2 of the training classes, in another order
    day_folder(root / "test_all", "test", list(range(10)), 90, 40)
    return {name: root / name for name in ("day1", "day2", "test_sub", "test_all")}


def names_read(manifest, offsets=None) -> list[str]:
    """Every sample's class name, in shard order, as the stream reads it (label -> manifest.classes)."""
    pieces = [Piece(s, 0, n) for s, n in enumerate(manifest.shard_sizes)]
    return [manifest.classes[int(sample["cls"])] for sample in read_pieces(manifest, pieces, True, None, offsets)]


def test_day1_classes_keep_their_indices_when_day2_is_added(days):
    day1, day2 = load_manifest(days["day1"]), load_manifest(days["day2"])
    both = load_manifests([str(days["day1"]), str(days["day2"])])
    assert both.classes[:7] == day1.classes == [NAMES[c] for c in DAY1]  # day 1's indices unchanged
    assert both.classes[7:] == [NAMES[9], NAMES[7], NAMES[8]]  # then day 2's new names, in its order
    counts = dict(zip(both.classes, both.class_counts))
    for name in both.classes:  # summed by name
        assert counts[name] == dict(zip(day1.classes, day1.class_counts)).get(name, 0) + dict(
            zip(day2.classes, day2.class_counts)).get(name, 0)
    assert both.num_samples == 500 and both.shard_sizes == [128, 128, 44, 96, 96, 8]
    # each sample read with its own class, by its folder's index and through the tar headers alike
    want = names_read(day1) + names_read(day2)
    assert names_read(both, ShardOffsets.load(both, ShardSource())) == want
    assert names_read(both) == want
    assert Counter(want)[NAMES[3]] > Counter(names_read(day1))[NAMES[3]]  # a class both days hold
    # random access (P×K, imprinting) gives the same union labels, item for item
    access = ShardRandomAccess(both)
    assert [both.classes[label] for label in access.labels.tolist()] == want
    assert [both.classes[access[i][1]] for i in (0, 299, 300, 499)] == [want[i] for i in (0, 299, 300, 499)]
    assert len(set(access.item_keys())) == 500  # day 1's and day 2's keys are told apart by folder identity
    # the same folder again is refused in one sentence
    with pytest.raises(ConfigError, match=r"day1 holds the shard train-000000.tar of .*day1, listed before it, so"):
        load_manifests([str(days["day1"]), str(days["day2"]), str(days["day1"])])
    with pytest.raises(ConfigError, match=r"holds the shard train-000001.tar of .*day1, listed before it"):
        load_manifests([str(days["day1"]), f"{days['day1']}/train-{{000001..000002}}.tar"])  # a pattern of it


def test_a_test_split_of_some_classes_is_read_with_the_training_labels(days):
    train = load_manifests([str(days["day1"]), str(days["day2"])])
    test = into_classes(load_manifests(str(days["test_sub"])), train.classes)
    assert test.classes == train.classes and test.num_samples == 60
    stream = ShardStream(test, rank=0, world_size=1, batch_size=16, train=False)
    labels = torch.cat([b.labels for b in make_loader(stream, 0, pin_memory=False)]).tolist()
    assert [train.classes[label] for label in labels] == names_read(load_manifest(days["test_sub"]))
    assert set(labels) == {2, 5}  # Pullover and Sandal: their day-1 indices, not the test folder's own 1 and 0


def test_a_test_class_training_lacks_is_one_sentence(days):
    cfg = compose_train_config(f"data.train=[{days['day1']}]", f"data.test={days['test_all']}")
    train, test = load_manifests([str(days["day1"])]), load_manifests(str(days["test_all"]))
    with pytest.raises(ConfigError) as error:
        check_against_data(cfg, train, test, None, 2, 2)
    assert str(error.value) == ("data.test holds class 'Sneaker' (and 2 more), which is not among the 7 training "
                                "classes of data.train; add a training folder that holds it to data.train, or "
                                "leave it out of data.test.")
    check_against_data(cfg, load_manifests([str(days["day1"]), str(days["day2"])]), test, None, 2, 2)  # all known


@pytest.mark.parametrize("overrides, message", [
    (["data.mix=[0.5]"], r"^data.mix=\[0.5\] does not give one share for each of the 2 folder\(s\) of data.train; "
                         r"give a list of 2 share\(s\), e.g. data.mix=\[1,1\].$"),
    (["data.mix=[0,1]"], r"^data.mix holds 0, but each share is the part of its folder an epoch reads; give numbers "
                         r"above 0 and at most 1 \(1: all of the folder\).$"),
    (["data.mix=[0.5,1.5]"], r"^data.mix holds 1.5, but each share"),
    (["data.mix=[0.5,1]", "sampler=pk"], r"^data.mix chooses part of each training folder for sampler=stream's "
                                         r"epochs, but sampler=pk draws"),
    (["data.train=[]"], r"^data.train=\[\] is not valid; give a folder of shards, or a list of folders"),
])
def test_data_lists_and_mix_are_checked_in_one_sentence(days, overrides, message):
    train = [f"data.train=[{days['day1']},{days['day2']}]"] if "data.train=[]" not in overrides else []
    cfg = compose_train_config(*train, f"data.test={days['test_all']}", "data.prepare=null", *overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_the_data_line_names_the_folders_and_what_an_epoch_is(days):
    cfg = compose_train_config(f"data.train=[{days['day1']},{days['day2']}]", f"data.test={days['test_sub']}",
                               "data.mix=[0.2,1]", "data.prepare=null")
    check_config(cfg)
    train, test = load_manifests(cfg.data.train), load_manifests(cfg.data.test)
    mix = data_mix(cfg.data, train)
    assert mix.folders == (0, 0, 0, 1, 1, 1) and mix.takes(train.shard_sizes) == [60, 200]
    assert folders_line(train, test, mix) == (
        f"data.train: {days['day1']} (300 samples, 7 classes) + {days['day2']} (200 samples, 5 classes, 3 new): "
        f"500 samples of 10 classes | an epoch: 60 of day1's 300 (mix 0.2) + all 200 of day2 = 260 samples | "
        f"data.test: {days['test_sub']} (60 samples, 2 classes)")
    assert data_mix(compose_train_config(f"data.train=[{days['day1']},{days['day2']}]", "data.mix=[1,1]").data,
                    train) is None  # all of every folder: no mix at all


def test_recog_data_info_of_several_folders_prints_the_union(days, capsys):
    assert data_cli(["info", str(days["day1"]), str(days["day2"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"{days['day1']}: 300 samples in 3 shards, 7 classes",
                       f"{days['day2']}: 200 samples in 3 shards, 5 classes",
                       "together: 500 samples in 6 shards, 10 classes"]
    union = load_manifests([str(days["day1"]), str(days["day2"])])
    assert out[3:] == [f"  {count:>8}  {name}" for name, count in zip(union.classes, union.class_counts)]


def global_steps(manifest, world, mix, done=(), epoch=2):
    """Every step of `epoch` not in `done`, as the ranks of `world` make it (4 micro-batches of 16): the ranks'
    batches joined in rank order."""
    from torchvision.transforms import v2

    per_rank = []
    for rank in range(world):
        stream = ShardStream(manifest, rank=rank, world_size=world, batch_size=16, train=True, seed=5, micro_batches=4,
                             shuffle_block=40, transform=v2.RandomHorizontalFlip(), mix=mix)
        stream.set_epoch(epoch, done)
        per_rank.append({b.step: b for b in make_loader(stream, 0, pin_memory=False)})
    return {step: (torch.cat([r[step].images for r in per_rank]), torch.cat([r[step].labels for r in per_rank]))
            for step in per_rank[0]}


@pytest.mark.parametrize("shares", [None, (0.2, 1.0)])
@pytest.mark.parametrize("before, after", [(1, 4), (2, 3), (4, 2)])
def test_a_list_resumed_mid_epoch_on_another_world_size_gives_the_same_batches(days, shares, before, after):
    """Two folders (with and without replay), read on `before` ranks for 2 steps, the rest on `after` ranks: every
    step is the uninterrupted epoch's on 4 ranks, image for image; none is made twice or left out."""
    both = load_manifests([str(days["day1"]), str(days["day2"])])
    mix = Mix(tuple(both.shard_folders), shares) if shares else None
    reference = global_steps(both, 4, mix)
    assert sum(len(labels) for _, labels in reference.values()) == (260 if shares else 500)
    first = dict(list(global_steps(both, before, mix).items())[:2])
    done = []
    for step in first:
        done = mark_done(done, step)
    rest = global_steps(both, after, mix, done)
    assert sorted([*first, *rest]) == sorted(reference)
    for step, (images, labels) in [*first.items(), *rest.items()]:
        assert torch.equal(images, reference[step][0]) and torch.equal(labels, reference[step][1])


def test_a_mid_epoch_position_of_other_folders_is_refused(days):
    layout = {"folders": ["aaaa", "bbbb"], "mix": [0.2, 1.0]}
    check_resumed_data({"done": [[0, 3]], **layout}, layout)  # the same folders and mix: resumed
    check_resumed_data({"done": [[0, 3]], "global_batch": 64}, layout)  # saved before positions named folders
    check_resumed_data({"done": [], "folders": ["aaaa"], "mix": None}, layout)  # at an epoch's end: allowed
    with pytest.raises(ConfigError) as error:
        check_resumed_data({"done": [[0, 3]], "folders": ["aaaa"], "mix": None}, layout)
    assert str(error.value) == (
        "the checkpoint stopped in the middle of an epoch of 1 training folder(s) (identities aaaa, data.mix=None), "
        "but this run reads 2 (identities aaaa, bbbb, data.mix=[0.2, 1.0]); resume with the data.train and "
        "data.mix it was saved with, or from a checkpoint saved at the end of an epoch.")


def test_union_stats_are_the_folders_weighted(days):
    day1, day2 = load_manifest(days["day1"]), load_manifest(days["day2"])
    both = load_manifests([str(days["day1"]), str(days["day2"])])
    stats = both.stats
    assert stats["channels"] == 1 and stats["height"] == {"min": 28, "median": 28, "max": 28}
    want = (300 * day1.stats["mean"][0] + 200 * day2.stats["mean"][0]) / 500
    assert stats["mean"][0] == pytest.approx(want, abs=1e-4)
    assert min(day1.stats["std"][0], day2.stats["std"][0]) <= stats["std"][0]


def test_two_processes_train_on_a_list_with_replay_and_a_test_subset(days, tmp_path):
    """train.py under torchrun (2 processes) on [day1, day2] with data.mix=[0.2,1], tested on 2 of the classes;
    its mid-epoch checkpoint resumed on 1 process ends the epoch; resumed over another list it is refused."""
    args = tiny_args({"train": f"[{days['day1']},{days['day2']}]", "test": days["test_sub"]}, **{
        "data.mix": "[0.2,1]", "batch_size": 16, "global_batch": 64, "checkpoint.every_steps": 2})
    run = tmp_path / "run"
    result = run_train(args + [f"hydra.run.dir={run}"], cwd=tmp_path, nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| an epoch: 60 of day1's 300 (mix 0.2) + all 200 of day2 = 260 samples |" in result.stdout
    assert "5 steps per epoch" in result.stdout  # ceil(ceil(260 / 4) / 16)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_samples"] == 60 and metrics["step"] == 5
    checkpoint = run / "checkpoints" / "step-000000002.pt"

    resumed = run_train(args + [f"resume={checkpoint}", f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=tmp_path,
                        nproc=None)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "world size changed from 2 to 1" in resumed.stdout
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["step"] == 5  # the 3 steps left

    other = [a for a in args if not a.startswith("data.mix=")] + ["data.mix=[0.5,1]"]
    refused = run_train(other + [f"resume={checkpoint}", f"hydra.run.dir={tmp_path / 'refused'}"], cwd=tmp_path,
                        nproc=None)
    assert refused.returncode != 0
    assert "the checkpoint stopped in the middle of an epoch of 2 training folder(s)" in refused.stderr + refused.stdout


def test_read_labels_out_of_a_folders_classes_are_skipped(days):
    """A shard whose label is outside its folder's class list (damaged) is not given another class's label."""
    from recog.data.stream import relabelled

    assert relabelled({"cls": b"1"}, (4, 7))["cls"] == b"7"
    assert not relabelled({"cls": b"2"}, (4, 7))["cls"].isdigit()
    assert relabelled({"cls": b"2"}, None)["cls"] == b"2" and relabelled({}, (4, 7)) == {}
    assert np.array_equal(ShardRandomAccess(load_manifest(days["day1"])).labels,
                          ShardRandomAccess(load_manifests([str(days["day1"])])).labels)


def test_a_mid_epoch_position_saved_before_folder_lists_resumes_exactly_on_one_folder():
    """A checkpoint of a recog that read one folder and recorded no folders or mix: its steps are kept for a run of
    one folder without a mix, and not for a run of two."""
    from recog.data.position import Position

    old = {"epoch": 2, "step": 25, "data": {"done": [[0, 5]], "world_size": 2, "global_batch": 128,
                                            "micro_batches": 2, "batch_size": 64, "sampler": "stream"}}
    base = {"global_batch": 128, "micro_batches": 2, "batch_size": 64, "sampler": "stream"}
    one = Position(batches_per_epoch=10, layout={**base, "folders": ["a1b2"], "mix": None}, world_size=1)
    one.load_state_dict(old)
    assert one.done == [[0, 5]] and one.step == 25
    two = Position(batches_per_epoch=10, layout={**base, "folders": ["a1b2", "c3d4"], "mix": None}, world_size=1)
    two.load_state_dict(old)
    assert two.done == [] and two.epoch == 2


def test_a_label_outside_its_folders_classes_is_never_another_class():
    from recog.data.stream import relabelled

    for own in (b"-1", b"3", b"x"):
        assert b"not one of its folder's 3 classes" in relabelled({"cls": own}, (5, 6, 7))["cls"]
    assert relabelled({"cls": b"2"}, (5, 6, 7))["cls"] == b"7"
