"""Atomic checkpoint writes and safe loads."""

import logging
import os

import pytest
import torch

from recog.checkpoint import (
    atomic_write,
    load_checkpoint,
    load_newest_checkpoint,
    save_checkpoint,
    save_step_checkpoint,
)
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


def test_step_checkpoints_keep_the_newest_and_link_last_and_best(tmp_path):
    for step, best in ((10, True), (20, False), (100, True), (110, False)):
        save_step_checkpoint({"step": step}, tmp_path, step, keep=2, is_best=best)
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt", "step-000000100.pt", "step-000000110.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 110
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 100


def test_newest_readable_checkpoint_is_found_and_a_damaged_one_is_reported(tmp_path, caplog):
    log = logging.getLogger("test")
    assert load_newest_checkpoint(tmp_path / "none-yet", log) is None  # a fresh run
    for step in (5, 10, 15):
        save_step_checkpoint({"step": step, "w": torch.arange(1000.0)}, tmp_path, step, keep=3, is_best=False)
    newest = tmp_path / "step-000000015.pt"
    newest.write_bytes(newest.read_bytes()[:2000])  # cut short, as by a crash of the disk
    (tmp_path / "step-000000010.pt").write_bytes(b"not a checkpoint at all")
    path, state = load_newest_checkpoint(tmp_path, log)
    assert path.name == "step-000000005.pt" and state["step"] == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "step-000000015.pt could not be read" in warnings[0]
    assert "Trying the one before it." in warnings[0]
    assert newest.exists()  # reported, never deleted

    (tmp_path / "step-000000005.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="none of the 3 checkpoints .* can be read; move them away"):
        load_newest_checkpoint(tmp_path, log)


def checkpoints_of(folder, recipe, every_steps=0, every_minutes=0, layout=None):
    from omegaconf import OmegaConf

    from recog.checkpoint import Checkpoints
    from recog.dist import Dist

    cfg = OmegaConf.create({"checkpoint": {"keep": 10, "every_steps": every_steps, "every_minutes": every_minutes}})
    return Checkpoints(cfg, Dist(0, 0, 1, 1, torch.device("cpu"), None), folder, recipe,
                       layout or {})


def linear_recipe(seed: int):
    from recog.build import StepRecipe
    from recog.loss import RecognitionLoss

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return StepRecipe(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), RecognitionLoss(), lr=0.1)


def test_mid_epoch_checkpoints_every_n_steps_and_every_t_minutes(tmp_path):
    import time

    from recog.checkpoint import Position

    recipe = linear_recipe(0)
    by_steps = checkpoints_of(tmp_path / "4-0", recipe, every_steps=4)
    for step in range(1, 21):  # two epochs of 10 steps; done: the epoch's steps
        by_steps.maybe_save_mid_epoch(Position(step // 10, step, [[0, step % 10 or 10]], batches_per_epoch=10))
    # steps 4, 8, 12, 16: 20 is an epoch's last step, whose end-of-epoch checkpoint follows
    assert sorted(p.name for p in by_steps.folder.glob("step-*")) == [f"step-{s:09d}.pt" for s in (4, 8, 12, 16)]
    state = load_checkpoint(by_steps.folder / "step-000000012.pt")
    assert state["epoch"] == 1 and state["data"] == {"done": [[0, 2]], "world_size": 1}

    by_time = checkpoints_of(tmp_path / "0-1", recipe, every_minutes=1)  # every minute, by rank 0's clock
    by_time.maybe_save_mid_epoch(Position(0, 1, [[0, 1]], batches_per_epoch=10))
    assert not by_time.folder.exists()
    by_time.last_time = time.monotonic() - 61  # as if the last save were a minute ago
    by_time.maybe_save_mid_epoch(Position(0, 2, [[0, 2]], batches_per_epoch=10))
    by_time.maybe_save_mid_epoch(Position(0, 3, [[0, 3]], batches_per_epoch=10))  # the clock restarted at the save
    assert [p.name for p in by_time.folder.glob("step-*")] == ["step-000000002.pt"]


def test_restore_puts_back_everything_save_wrote(tmp_path):
    from recog.checkpoint import Position

    layout = {"global_batch": 64, "micro_batches": 2}
    trained = linear_recipe(0)
    loss = trained.model(torch.ones(4, 3)).sum()
    loss.backward()
    trained.optimizer.step()  # momentum buffers: optimizer state worth restoring
    trained.scheduler.step()
    saver = checkpoints_of(tmp_path, trained, layout=layout)
    saver.save(Position(1, 7, [[0, 2], [5, 8]], batches_per_epoch=10), top1=0.5)
    saver.save(Position(2, 9, [], batches_per_epoch=10), top1=0.25)  # a worse epoch: best stays 0.5
    rng_after_save = torch.get_rng_state()

    fresh = linear_recipe(1)  # other weights, no optimizer state
    torch.manual_seed(123)
    restorer = checkpoints_of(tmp_path, fresh, layout=layout)
    state = load_checkpoint(tmp_path / "step-000000009.pt")
    position = restorer.restore((str(tmp_path / "step-000000009.pt"), state),
                               Position(batches_per_epoch=10))
    assert (position.epoch, position.step, position.done) == (2, 9, [])
    assert (restorer.best_top1, restorer.top1, restorer.last_step) == (0.5, 0.25, 9)
    for key, value in trained.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value)
    momentum = fresh.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, trained.optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert fresh.scheduler.last_epoch == position.schedule_step == 20  # the schedule goes by the data trained on
    assert torch.equal(torch.get_rng_state(), rng_after_save)  # the RNG as it was at the save

    # a mid-epoch position comes back for the same global batch and micro-batches, whatever the world size
    mid = load_checkpoint(tmp_path / "step-000000007.pt")
    again = restorer.restore(("mid", mid), Position(batches_per_epoch=10))
    assert (again.epoch, again.done, again.steps_done) == (1, [[0, 2], [5, 8]], 5) and again.mid_epoch
    other = checkpoints_of(tmp_path, fresh, layout={"global_batch": 128, "micro_batches": 4})
    assert other.restore(("mid", mid), Position(batches_per_epoch=10)).done == []


def proxy_recipe(seed: int, model_only_optimizer: bool = False):
    """A linear model with a proxy loss (2 classes, 2 dimensions), its optimizer over both unless asked not to
    (what recog did before it trained a loss's parameters), after one step."""
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    from recog.build import StepRecipe, parameter_groups
    from recog.loss import RecognitionLoss
    from recog.model import Output

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    loss_fn = RecognitionLoss(metric=ProxyAnchorLoss(num_classes=2, embedding_size=2), metric_weight=1.0, lr_scale=10.0)
    params = model.parameters() if model_only_optimizer else parameter_groups(model, loss_fn, lr=0.1)
    recipe = StepRecipe(model, torch.optim.SGD(params, lr=0.1, momentum=0.9), loss_fn, lr=0.1)
    out = model(torch.randn(6, 3))
    loss_fn(Output(out, out), torch.arange(6) % 2)["total"].backward()
    recipe.optimizer.step()
    return recipe


def test_a_losss_parameters_and_their_optimizer_state_are_saved_and_restored(tmp_path):
    from recog.checkpoint import Position

    trained = proxy_recipe(0)
    checkpoints_of(tmp_path, trained).save(Position(0, 1, [[0, 1]], batches_per_epoch=10))
    state = load_checkpoint(tmp_path / "step-000000001.pt")
    assert list(state["loss"]) == ["metric.proxies"] and list(state["model"]) == ["weight", "bias"]

    fresh = proxy_recipe(1)
    checkpoints_of(tmp_path, fresh).restore(("ck", state), Position(batches_per_epoch=10))
    assert torch.equal(fresh.loss_fn.metric.proxies, trained.loss_fn.metric.proxies)
    momentum = [s["momentum_buffer"] for s in fresh.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum,
                                                                   trained.optimizer.state_dict()["state"].values()))
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [0.1, 1.0]  # each group at its own scale
    assert fresh.scheduler.base_lrs == [0.1, 1.0]


def test_a_checkpoint_without_the_losss_state_loads_with_a_note_and_fresh_proxies(tmp_path, caplog):
    """Written before recog saved the loss: no "loss", one optimizer group (the model's)."""
    from recog.checkpoint import Position

    old = proxy_recipe(0, model_only_optimizer=True)
    checkpoints_of(tmp_path, old).save(Position(0, 1, [[0, 1]], batches_per_epoch=10))
    state = load_checkpoint(tmp_path / "step-000000001.pt")
    del state["loss"]
    fresh = proxy_recipe(1)
    proxies = fresh.loss_fn.metric.proxies.detach().clone()
    with caplog.at_level(logging.WARNING, logger="recog"):
        checkpoints_of(tmp_path, fresh).restore(("old.pt", state), Position(batches_per_epoch=10))
    assert "old.pt holds no state of the loss" in caplog.text and "start fresh" in caplog.text
    assert torch.equal(fresh.model.weight, old.model.weight) and torch.equal(fresh.loss_fn.metric.proxies, proxies)
    assert len(fresh.optimizer.param_groups) == 2 and fresh.optimizer.param_groups[1]["lr"] == 1.0
    assert set(fresh.optimizer.state_dict()["state"]) == {0, 1}  # the model's momentum; none yet for the proxies


def test_resuming_with_another_loss_is_one_sentence(tmp_path):
    from omegaconf import OmegaConf

    from recog.checkpoint import Position, find_resume_point
    from recog.dist import Dist
    from recog.loss import RecognitionLoss

    trained = proxy_recipe(0)
    path = checkpoints_of(tmp_path, trained).save(Position(0, 1, [[0, 1]], batches_per_epoch=10))
    cfg = OmegaConf.create({"checkpoint": {"auto_resume": False}, "resume": str(path), "model": {"backbone": "x"}})
    one = Dist(0, 0, 1, 1, torch.device("cpu"), None)
    assert find_resume_point(cfg, tmp_path, one, trained.model, trained.loss_fn)[0] == str(path)
    with pytest.raises(ConfigError, match="was trained with another loss .*metric.proxies not in this"):
        find_resume_point(cfg, tmp_path, one, trained.model, RecognitionLoss())
