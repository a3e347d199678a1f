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


def checkpoints_of(folder, recipe, position=None, every_steps=0, every_minutes=0):
    from omegaconf import OmegaConf

    from recog.checkpoint import Checkpoints, RandomState
    from recog.data.position import Position

    settings = OmegaConf.create({"keep": 10, "every_steps": every_steps, "every_minutes": every_minutes})
    components = {"position": position or Position(batches_per_epoch=10), "recipe": recipe,
                  "rng": RandomState(torch.device("cpu"))}
    return Checkpoints(settings, folder, True, components, config={"model": {"backbone": "linear"}})


def linear_recipe(seed: int, position=None):
    from recog.loss import RecognitionLoss
    from recog.step import StepRecipe

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    return StepRecipe(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), RecognitionLoss(), lr=0.1,
                      position=position)


def test_mid_epoch_checkpoints_every_n_steps_and_every_t_minutes(tmp_path):
    import time

    from recog.data.position import Position

    position = Position(batches_per_epoch=10)
    by_steps = checkpoints_of(tmp_path / "4-0", linear_recipe(0), position, every_steps=4)
    for step in range(1, 21):  # two epochs of 10 steps, as the loop decides: not on an epoch's last step
        position.advance(step - 1 - 10 * position.epoch)
        if not position.epoch_done:
            by_steps.save_if_due(position.step)
        else:
            position.next_epoch()
    # steps 4, 8, 12, 16: 20 is an epoch's last step, whose end-of-epoch checkpoint follows
    assert sorted(p.name for p in by_steps.folder.glob("step-*")) == [f"step-{s:09d}.pt" for s in (4, 8, 12, 16)]
    state = load_checkpoint(by_steps.folder / "step-000000012.pt")
    assert state["epoch"] == 1 and state["data"] == {"done": [[0, 2]], "world_size": 1}

    by_time = checkpoints_of(tmp_path / "0-1", linear_recipe(0), every_minutes=1)  # every minute, by rank 0's clock
    assert not by_time.minutes_up()
    by_time.save_if_due(1)
    assert not by_time.folder.exists()
    by_time.last_time = time.monotonic() - 61  # as if the last save were a minute ago
    assert by_time.minutes_up()
    by_time.is_main = False
    assert not by_time.minutes_up()  # only rank 0's clock speaks
    by_time.is_main = True
    # rank 0 raised its flag after step 2 and again after step 3 (before the save it asked for): every rank learns
    # each a step later, and saves once
    by_time.save_if_due(3, minutes_up=True)
    assert not by_time.minutes_up()  # the clock restarted at the save
    by_time.save_if_due(4, minutes_up=True)
    by_time.save(10, top1=0.5)  # an epoch's end at the step rank 0 raised its flag: it answers that flag
    by_time.save_if_due(11, minutes_up=True)
    assert [p.name for p in sorted(by_time.folder.glob("step-*"))] == ["step-000000003.pt", "step-000000010.pt"]


def test_restore_puts_back_everything_save_wrote(tmp_path):
    from recog.data.position import Position

    layout = {"global_batch": 64, "micro_batches": 2}
    saved_at = Position(1, 7, [[0, 2], [5, 8]], batches_per_epoch=10, layout=layout)
    trained = linear_recipe(0, saved_at)
    loss = trained.model(torch.ones(4, 3)).sum()
    loss.backward()
    trained.optimizer.step()  # momentum buffers: optimizer state worth restoring
    trained.scheduler.step()
    saver = checkpoints_of(tmp_path, trained, saved_at)
    saver.save(7, top1=0.5)
    saved_at.step, saved_at.epoch, saved_at.done = 9, 2, []
    saver.save(9, top1=0.25)  # a worse epoch: best stays 0.5
    rng_after_save = torch.get_rng_state()

    position = Position(batches_per_epoch=10, layout=layout)
    fresh = linear_recipe(1, position)  # other weights, no optimizer state
    torch.manual_seed(123)
    restorer = checkpoints_of(tmp_path, fresh, position)
    restorer.restore((str(tmp_path / "step-000000009.pt"), load_checkpoint(tmp_path / "step-000000009.pt")))
    assert (position.epoch, position.step, position.done) == (2, 9, [])
    assert (restorer.best_top1, restorer.top1) == (0.5, 0.25)
    assert restorer.resumed_from == str(tmp_path / "step-000000009.pt")
    for key, value in trained.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value)
    momentum = fresh.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, trained.optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert fresh.scheduler.last_epoch == position.schedule_step == 20  # the schedule goes by the data trained on
    assert torch.equal(torch.get_rng_state(), rng_after_save)  # the RNG as it was at the save

    # a mid-epoch position comes back for the same global batch and micro-batches, whatever the world size
    mid = load_checkpoint(tmp_path / "step-000000007.pt")
    restorer.restore(("mid", mid))
    assert (position.epoch, position.done, position.steps_done) == (1, [[0, 2], [5, 8]], 5) and position.mid_epoch
    other = Position(batches_per_epoch=10, layout={"global_batch": 128, "micro_batches": 4}, world_size=2)
    checkpoints_of(tmp_path, linear_recipe(1, other), other).restore(("mid", mid))
    assert other.done == [] and other.step == 7


def test_the_components_states_are_one_dictionary_without_overlaps(tmp_path):
    from recog.data.position import Position

    class Clashing:
        def state_dict(self):
            return {"step": 3}

    checkpoints = checkpoints_of(tmp_path, linear_recipe(0))
    assert set(checkpoints.state_dict()) == {"model", "loss", "optimizer", "scheduler", "scaler", "epoch", "step",
                                             "data", "rng", "top1", "best_top1", "config"}
    checkpoints.components["clash"] = Clashing()
    with pytest.raises(ValueError, match="clash names .'step'."):
        checkpoints.save(Position().step)


def proxy_recipe(seed: int):
    """A linear model with a proxy loss (2 classes, 2 dimensions), its optimizer over both, after one step."""
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    from recog.build import parameter_groups
    from recog.loss import RecognitionLoss
    from recog.model import Output
    from recog.step import StepRecipe

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    loss_fn = RecognitionLoss(metric=ProxyAnchorLoss(num_classes=2, embedding_size=2), metric_weight=1.0, lr_scale=10.0)
    recipe = StepRecipe(model, torch.optim.SGD(parameter_groups(model, loss_fn, lr=0.1), lr=0.1, momentum=0.9),
                        loss_fn, lr=0.1)
    out = model(torch.randn(6, 3))
    loss_fn(Output(out, out), torch.arange(6) % 2)["total"].backward()
    recipe.optimizer.step()
    return recipe


def test_a_losss_parameters_and_their_optimizer_state_are_saved_and_restored(tmp_path):
    trained = proxy_recipe(0)
    state = trained.state_dict()
    assert list(state["loss"]) == ["metric.proxies"] and list(state["model"]) == ["weight", "bias"]

    fresh = proxy_recipe(1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.loss_fn.metric.proxies, trained.loss_fn.metric.proxies)
    momentum = [s["momentum_buffer"] for s in fresh.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum,
                                                                   trained.optimizer.state_dict()["state"].values()))
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [0.1, 1.0]  # each group at its own scale
    assert fresh.scheduler.base_lrs == [0.1, 1.0]


def test_resuming_with_another_model_or_loss_is_one_sentence(tmp_path):
    from omegaconf import OmegaConf

    from recog.checkpoint import check_resume_point, find_resume_point
    from recog.dist import Dist

    trained = proxy_recipe(0)
    path = checkpoints_of(tmp_path, trained).save(1)
    settings = OmegaConf.create({"auto_resume": False})
    one = Dist(0, 0, 1, 1, torch.device("cpu"), None)
    found = find_resume_point(settings, str(path), tmp_path, one)
    assert found[0] == str(path)
    check_resume_point(found, tmp_path, "linear", trained.mismatch)  # fits
    with pytest.raises(ConfigError, match="was trained with another loss .*metric.proxies not in this"):
        check_resume_point(found, tmp_path, "linear", linear_recipe(0).mismatch)
    wider = proxy_recipe(0)
    wider.model = torch.nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="holds a linear model that does not fit the wide model of this run "
                                          r"\(weight has shape \(2, 3\) .*start from its weights with weights="):
        check_resume_point(found, tmp_path, "wide", wider.mismatch)


def test_a_file_that_is_not_a_training_checkpoint_is_one_sentence(tmp_path):
    from omegaconf import OmegaConf

    from recog.checkpoint import find_resume_point
    from recog.dist import Dist

    weights = save_checkpoint(torch.nn.Linear(3, 2).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ConfigError, match="is not a recog training checkpoint .*use weights= instead of resume="):
        find_resume_point(OmegaConf.create({"auto_resume": True}), str(weights), tmp_path,
                          Dist(0, 0, 1, 1, torch.device("cpu"), None))


def test_a_folder_or_a_device_given_as_a_checkpoint_is_one_sentence_naming_the_option(tmp_path):
    """One check for every option that takes a checkpoint (resume=, weights=, recog.export, recog.embed's model=)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"is a folder, not a checkpoint; give a checkpoint file written by "
                                          r"train\.py, e\.g\. outputs/<run>/checkpoints/best\.pt to weights=\.$"):
        load_checkpoint(run, "weights=")
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"give a checkpoint file inside it, e.g. {run}/checkpoints/last.pt to "
                                          "resume="):
        load_checkpoint(run, "resume=")
    with pytest.raises(ConfigError, match=r"^/dev/zero is not a regular file \(a device, FIFO or socket\)"):
        load_checkpoint("/dev/zero", "resume=")


def sharded_recipe(seed: int):
    """A StepRecipe whose loss holds a sharded classifier (one process: all 10 rows), trained by AdamW."""
    from recog.build import parameter_groups
    from recog.sharded import ShardedClassifier, ShardedLoss
    from recog.step import StepRecipe

    torch.manual_seed(seed)  # the model's start; the classifier's rows and Partial FC's draws follow the run's seed
    model, loss_fn = torch.nn.Linear(6, 8), ShardedLoss(ShardedClassifier(10, 8, seed=3, sample_rate=0.5))
    with torch.no_grad():
        loss_fn.classifier.weight.add_(seed)
    return StepRecipe(model, torch.optim.AdamW(parameter_groups(model, loss_fn, 0.1), lr=0.1), loss_fn, lr=0.1)


def test_a_sharded_classifier_s_rows_and_adamw_state_are_saved_apart_and_restored(tmp_path):
    """StepRecipe.state_dict leaves the rows and their per-row AdamW state out (each rank writes its own slice,
    ClassifierRows); restored into a recipe that started elsewhere, rows, exp_avg, exp_avg_sq, AdamW's step and
    Partial FC's step all come back, and the next step is the one the saved recipe takes."""
    from recog.checkpoint import ClassifierRows
    from recog.dist import Dist
    from recog.model import Output

    ctx = Dist(0, 0, 1, 1, torch.device("cpu"), None)
    saved = sharded_recipe(seed=1)
    x, labels = torch.randn(4, 6), torch.tensor([0, 3, 5, 9])

    def step(recipe):
        output = Output(torch.nn.functional.normalize(recipe.model(x), dim=1), torch.zeros(4, 0))
        recipe.loss_fn(output, labels)["total"].backward()
        recipe.optimizer.step()
        recipe.optimizer.zero_grad()

    for _ in range(2):
        step(saved)
    state = load_checkpoint(save_checkpoint(saved.state_dict(), tmp_path / "step-2.pt"))  # nothing shared with it
    assert "classifier.weight" not in state["loss"] and int(state["loss"]["classifier.step"]) == 2
    rows_state = state["optimizer"]["state"][2]  # model weight, bias, then the rows (the loss's group)
    assert set(rows_state) == {"step"}  # exp_avg and exp_avg_sq: one value per row, in the slice files
    ClassifierRows(saved.sharded_classifier(), saved.optimizer, ctx).save(tmp_path / "step-2.rows")

    restored = sharded_recipe(seed=2)
    assert not torch.equal(restored.sharded_classifier().weight, saved.sharded_classifier().weight)
    assert restored.mismatch(state) is None
    restored.load_state_dict(state)
    ClassifierRows(restored.sharded_classifier(), restored.optimizer, ctx).restore(tmp_path / "step-2.rows")
    mine, theirs = restored.sharded_classifier().weight, saved.sharded_classifier().weight
    assert torch.equal(mine, theirs)
    for name in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored.optimizer.state[mine][name], saved.optimizer.state[theirs][name]), name
    step(saved), step(restored)
    assert torch.equal(mine, theirs) and torch.equal(restored.model.weight, saved.model.weight)
