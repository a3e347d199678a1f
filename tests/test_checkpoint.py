"""Atomic checkpoint writes and safe loads."""

import os

import pytest
import torch

from recog.checkpoint import atomic_write, load_checkpoint, save_checkpoint, save_epoch_checkpoint
from recog.errors import ConfigError


def test_save_and_load_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "epoch": 3, "config": {"lr": 0.1, "name": "x"}}
    path = save_checkpoint(state, tmp_path / "ck" / "last.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3
    assert os.listdir(tmp_path / "ck") == ["last.pt"]  # no temporary file left behind


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pt")

    def dies_half_way(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_truncated_or_missing_checkpoint_is_one_sentence(tmp_path):
    path = save_checkpoint({"w": torch.zeros(1000)}, tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ConfigError, match="could not be read"):
        load_checkpoint(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": os.getcwd, "w": torch.zeros(1)}, path)  # a function: needs full unpickling
    with pytest.raises(ConfigError):
        load_checkpoint(path)


def test_epoch_checkpoints_keep_the_newest_and_link_last_and_best(tmp_path):
    for epoch, best in ((1, True), (2, False), (3, True), (4, False)):
        save_epoch_checkpoint({"epoch": epoch}, tmp_path, epoch, keep=2, is_best=best)
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "epoch-0003.pt", "epoch-0004.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
