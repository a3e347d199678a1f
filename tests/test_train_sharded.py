"""model.classifier=sharded end to end, for real: train.py under torchrun with 2 gloo processes, each holding half
of the classifier's rows (recog.sharded), against the replicated classifier, and resumed on 1 process.

One module-scoped set of runs on 256 training images (2 epochs of 3 steps, AdamW), each step's global
batch of 96 cut into 3 micro-batches of 32: rank 0 of 2 reads one of them, rank 1 two, so rank 0 makes an empty
forward pass each step to keep the sharded classifier's collectives in step (StepRecipe.rounds):
  sharded    2 processes, model.classifier=sharded
  replicated 2 processes, the default classifier, the same seed: the two runs start from the same numbers (the
             sharded rows are drawn as RecognitionModel draws its own, recog.build.build_loss)
  resumed    1 process, model.classifier=sharded, from the sharded run's epoch-1 checkpoint (its rows in two slice
             files re-sliced into one), to the end of epoch 2
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, recog_frames, run_train, tiny_args, tiny_split
from test_train import read_scalars

from recog.checkpoint import load_checkpoint
from recog.classifier_files import read_layout, read_rows
from recog.config import check_config
from recog.errors import ConfigError
from recog.model import RecognitionModel
from recog.rundir import compose_train_config

pytestmark = pytest.mark.slow

CLASSES, DIM = 10, 128
# fp32 throughout. The sharded loss adds its log-sum-exp over two ranks' partial sums, the replicated one over all
# classes at once, and the rows' gradient is scaled in another order: the runs differ by rounding, which AdamW then
# amplifies. Its update of an element is lr * m / (sqrt(v) + eps): a weight whose gradient is at rounding level
# (some conv weights here) moves by up to lr either way, so the backbone can differ by a fraction of one step's
# update (lr = 0.006 * 96 / 256 = 2.25e-3) while every loss agrees. Measured over these 6 steps: the first step's
# loss equal, the others within 1e-4 (5e-5 of the loss), the rows within 1.5e-6, AdamW's exp_avg of them within
# 3e-4 of its largest value, exp_avg_sq 2e-5, backbone parameters and BatchNorm statistics within 1.7e-4. Each
# tolerance is ~3-10 times that, and far below what a mistake gives: a loss term assembled wrongly changes the first
# step's loss by > 1e-2, a gradient scaled wrongly (which AdamW's update would hide) changes exp_avg by its factor,
# rows from the wrong rank or an optimizer state not restored move the rows by ~lr (each check asserts the steps
# moved what it compares by more than a hundred times its tolerance).
FIRST_LOSS, LOSS, ROWS, STATE, BACKBONE = 1e-6, 1e-3, 1e-5, 1e-3, 5e-4  # LOSS and STATE: relative to the value


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    tiny_split(root / "train", "train", 256, 128)
    tiny_split(root / "test", "test", 96, 64)
    return {"train": root / "train", "test": root / "test"}


def args(data, run, **overrides):
    return tiny_args(data, epochs=2, log_every=1, global_batch=96, **{"checkpoint.keep": 3, **overrides}) + [
        f"hydra.run.dir={run}"]


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sharded = run_train(args(small_data, root / "sharded", **{"model.classifier": "sharded"}), cwd=root, nproc=2)
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr

    torch.manual_seed(0)  # train.py's seed: the backbone and rows both runs start from (recog.build.build_loss)
    start = RecognitionModel("convnet", CLASSES, 1, width=16).state_dict()
    torch.save(start, root / "start.pt")
    replicated = run_train(args(small_data, root / "replicated"), cwd=root, nproc=2)  # no weights=: the same seed
    assert replicated.returncode == 0, replicated.stdout + replicated.stderr

    epoch1 = root / "sharded" / "checkpoints" / "step-000000003.pt"
    resumed = run_train(args(small_data, root / "resumed", **{"model.classifier": "sharded", "resume": epoch1}),
                        cwd=root, nproc=None)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return {"root": root, "sharded": sharded, "replicated": replicated, "resumed": resumed}


def rows(run, step: int) -> dict[str, torch.Tensor]:
    """The whole classifier (and its optimizer state) a sharded run saved at `step`, read from its slice files."""
    folder = run / "checkpoints" / f"step-{step:09d}.rows"
    return read_rows(folder, range(CLASSES), total=CLASSES)


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_two_processes_train_a_sharded_classifier_and_report_top1(runs):
    run = runs["root"] / "sharded"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["world_size"] == 2 and metrics["eval_samples"] == 96
    assert 0.0 <= metrics["top1"] <= 1.0 and "| top-1 " in runs["sharded"].stdout  # equal to replicated's: below
    losses = read_scalars(run / "tb")["train/loss"]
    assert losses[-1] < losses[0] - 0.5, losses  # it trains (6 steps, mostly warmup: top-1 is still near chance)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert "class_weights" not in ckpt["model"] and "classifier.weight" not in ckpt["loss"]  # the rows: apart
    assert ckpt["classifier_rows"] == "step-000000006.rows"
    layout = read_layout(run / "checkpoints" / "step-000000006.rows")  # one slice file per rank, complete
    assert [(f["start"], f["stop"]) for f in layout["files"]] == [(0, 5), (5, 10)]
    assert sorted(layout["tensors"]) == ["exp_avg", "exp_avg_sq", "weight"]  # AdamW's state of each row too
    # checkpoint.keep=3 of 2 epochs: both kept, their folders too; a folder no checkpoint names would be removed
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [
        "step-000000003.pt", "step-000000003.rows", "step-000000006.pt", "step-000000006.rows"]
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_sharded_training_equals_the_replicated_classifier(runs):
    """Same seed, same start: every step's loss, the top-1, the backbone and the rows (and AdamW's state of
    them) after each epoch equal the replicated run's, within fp32 rounding (amplified by AdamW: see above)."""
    sharded, replicated = runs["root"] / "sharded", runs["root"] / "replicated"
    losses = read_scalars(sharded / "tb")["train/loss"], read_scalars(replicated / "tb")["train/loss"]
    assert len(losses[0]) == len(losses[1]) == 6
    assert abs(losses[0][0] - losses[1][0]) < FIRST_LOSS, losses
    assert max(abs(a - b) / b for a, b in zip(*losses)) < LOSS, losses
    top1 = [json.loads((run / "metrics.json").read_text())["top1"] for run in (sharded, replicated)]
    assert abs(top1[0] - top1[1]) <= 1 / 96  # at most one of the 96 test images on the other side of a near tie
    for step in (3, 6):
        mine = load_checkpoint(sharded / "checkpoints" / f"step-{step:09d}.pt")
        theirs = load_checkpoint(replicated / "checkpoints" / f"step-{step:09d}.pt")
        assert set(theirs["model"]) - set(mine["model"]) == {"class_weights"}
        for key, value in mine["model"].items():  # the backbone, the embedding head, BatchNorm's statistics
            assert largest(value, theirs["model"][key]) < BACKBONE, (step, key)
        saved = rows(sharded, step)
        assert largest(saved["weight"], theirs["model"]["class_weights"]) < ROWS, step
        for name in ("exp_avg", "exp_avg_sq"):
            expected = theirs["optimizer"]["state"][0][name]  # class_weights: the model's own, its first parameter
            assert expected.shape == (CLASSES, DIM)
            assert largest(saved[name], expected) <= STATE * expected.abs().max().item(), (step, name)
    start = torch.load(runs["root"] / "start.pt", weights_only=True)
    assert largest(rows(sharded, 3)["weight"], start["class_weights"]) > 100 * ROWS  # the rows moved (4.5e-3)


def test_resumed_on_one_process_the_rows_are_re_sliced_and_training_goes_on(runs):
    """The 1-process run reads both ranks' slice files into its one slice (weights and AdamW's state), and its
    epoch 2 ends where the 2-process run's did."""
    assert "resumed from" in runs["resumed"].stdout and "epoch 1/2" not in runs["resumed"].stdout
    resumed, sharded = runs["root"] / "resumed", runs["root"] / "sharded"
    layout = read_layout(resumed / "checkpoints" / "step-000000006.rows")
    assert [(f["start"], f["stop"]) for f in layout["files"]] == [(0, 10)]
    one, two = rows(resumed, 6), rows(sharded, 6)
    moved = largest(two["weight"], rows(sharded, 3)["weight"])
    assert moved > 100 * ROWS  # epoch 2 moved the rows (by 4.3e-3): the comparison can fail
    assert largest(one["weight"], two["weight"]) < ROWS  # measured: 3e-8
    for name in ("exp_avg", "exp_avg_sq"):  # measured: 1.2e-5 and 5e-7 of the largest
        assert largest(one[name], two[name]) <= STATE * two[name].abs().max().item(), name
    a = load_checkpoint(resumed / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(sharded / "checkpoints" / "last.pt")["model"]
    # the parameters; BatchNorm's running statistics differ on any change of world size (one process updates them
    # from each of its three micro-batches, two processes from theirs, then rank 0's are kept), sharded or not
    parameters = [key for key in b if key.rsplit(".", 1)[-1] not in ("running_mean", "running_var",
                                                                      "num_batches_tracked")]
    assert len(parameters) > 10 and max(largest(a[key], b[key]) for key in parameters) < BACKBONE  # measured: 3e-5


def test_every_minutes_saves_every_ranks_rows_at_the_same_step_and_the_run_resumes_from_it(small_data, tmp_path):
    """checkpoint.every_minutes with a sharded classifier: rank 0's clock, agreed in the per-step stop-flag
    exchange, makes both ranks write their rows at the same mid-epoch step; a run resumed from it ends where the
    uninterrupted one did, step for step."""
    minutes = {"model.classifier": "sharded", "checkpoint.every_minutes": "0.000001", "checkpoint.keep": 10,
               "dist.stop_check_s": 0}  # the ranks agree after every step (by default: about once a second)
    first = run_train(args(small_data, tmp_path / "first", **minutes), cwd=tmp_path, nproc=2)
    assert first.returncode == 0, first.stdout + first.stderr
    checkpoints = tmp_path / "first" / "checkpoints"
    # rank 0's clock is up after every step; every rank learns it a step later and saves unless a save came since
    # the step before: at 2 and 5, beside the epoch ends 3 and 6 (4: step 3's end-of-epoch save answered it)
    assert sorted(p.name for p in checkpoints.glob("step-*.pt")) == [f"step-{s:09d}.pt" for s in (2, 3, 5, 6)]
    mid = load_checkpoint(checkpoints / "step-000000002.pt")
    assert (mid["epoch"], mid["step"], mid["classifier_rows"]) == (0, 2, "step-000000002.rows")
    layout = read_layout(checkpoints / "step-000000002.rows")  # both ranks' slices of step 2, complete
    assert [(f["start"], f["stop"]) for f in layout["files"]] == [(0, 5), (5, 10)]

    resumed = run_train(args(small_data, tmp_path / "resumed", **minutes, resume=checkpoints / "step-000000002.pt"),
                        cwd=tmp_path, nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    losses = read_scalars(tmp_path / "first" / "tb")["train/loss"], read_scalars(tmp_path / "resumed" / "tb")[
        "train/loss"]
    assert losses[1] == losses[0][2:], losses  # steps 3 to 6, as the uninterrupted run took them
    again = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in again.glob("step-*.pt")) == [f"step-{s:09d}.pt" for s in (3, 5, 6)]
    for name, value in read_rows(again / "step-000000006.rows", range(CLASSES), total=CLASSES).items():
        assert torch.equal(value, rows(tmp_path / "first", 6)[name]), name


@pytest.mark.parametrize("overrides,message", [
    (["loss=ce_triplet", "sampler=pk", "loss.cross_rank=true"], "loss.cross_rank=true gathers equal batches from "
                                                                 "every process"),
    (["perf.compile=true"], "perf.compile=true would compile the sharded classifier's collectives"),
    (["perf.precision=fp16"], "perf.precision=fp16 would let each process's gradient scaler skip a step"),
    (["loss.sample_rate=0"], r"loss.sample_rate=0 is not valid; give a number above 0"),
    (["loss.sample_rate=1.5"], r"loss.sample_rate=1.5 is the share of classes scored each step"),
    (["model.classifier=split"], "model.classifier=split is unknown; use replicated"),
])
def test_what_sharded_does_not_do_is_refused_before_any_process_group(tiny_data, overrides, message):
    cfg = compose_train_config(f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}",
                               "model.classifier=sharded", *overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["model.classifier=sharded", "loss=ce_triplet", "sampler=pk", "loss.cross_rank=true"],
     "loss.cross_rank=true gathers equal batches from every process"),
    (["loss.sample_rate=0.1"], "loss.sample_rate=0.1 samples the classes of a sharded classifier; add "
                               "model.classifier=sharded"),
])
def test_refusals_under_torchrun_are_one_sentence(tiny_data, tmp_path, overrides, message):
    result = run_train(tiny_args(tiny_data) + overrides, cwd=tmp_path, nproc=2, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not recog_frames(result.stderr), result.stderr



def test_a_sharded_run_exports_its_embedder(runs, tmp_path):
    """The export is the model's embeddings (the classifier's rows stay in their slice files); the classes are the
    checkpoint's names."""
    # in a process of its own: torch.export starts autograd's threads here, which later forked tests cannot have
    done = subprocess.run([sys.executable, "-m", "recog.export", str(runs["root"] / "sharded" / "checkpoints" /
                                                                     "last.pt"), str(tmp_path / "export"), "--no-onnx"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads((tmp_path / "export" / "model.json").read_text())
    assert len(info["classes"]) == CLASSES and info["embedding_dim"] == DIM
