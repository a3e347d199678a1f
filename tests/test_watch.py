"""Watching a run: rank 0's progress lines with ETAs, eval.every_steps between epoch ends (leaving training bit for
bit as without it), top-5, per-class top-1 and the confusion matrix read back from TensorBoard's event files."""

import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from conftest import run_train, tiny_args
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recog.checkpoint import load_checkpoint
from recog.data.position import Position
from recog.eval_figures import Tally, confusion_image, worst_classes
from recog.progress import Progress, duration

# 1,000 training images, global batch 128 on 2 ranks: 8 steps an epoch; with eval.every_steps=3, evaluations at
# steps 3, 6, 9, 12 and 15, and at each epoch's end (8, 16).
ARGS = {"epochs": 2, "batch_size": 64, "log_every": 2, "model.width": 8}
EVERY = 3


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The same run twice under torchrun (2 processes): with eval.every_steps=3, and without."""
    root = tmp_path_factory.mktemp("watch")
    out = {}
    for name, extra in (("every", [f"eval.every_steps={EVERY}"]), ("plain", [])):
        result = run_train(tiny_args(tiny_data, **ARGS) + extra + [f"hydra.run.dir={root / name}"], cwd=root)
        assert result.returncode == 0, result.stdout + result.stderr
        out[name] = (root / name, result.stdout)
    return out


def events(run_dir):
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_progress_lines_with_an_eta_inside_the_epoch(runs):
    run_dir, stdout = runs["plain"]
    lines = re.findall(r"step (\d+)/16 \| epoch (\d)/2 \((\d)/8\) \| loss [\d.]+ \| \d+ images/s \| "
                       r"data wait [\d.]+% \| epoch ETA (\S+) \| run ETA (\S+)", stdout)
    assert [int(step) for step, *_ in lines] == [2, 4, 6, 8, 10, 12, 14, 16], stdout  # every log_every steps
    inside = [line for line in lines if int(line[2]) < 8]
    assert inside and all(re.fullmatch(r"\d+:\d\d:\d\d", eta) for *_, eta_epoch, eta in inside
                          for eta in (eta_epoch, eta)), lines
    assert (run_dir / "train.log").read_text().count("run ETA") == 8  # the log file has them too
    assert "\r" not in stdout  # no terminal here: plain lines, no bar


@pytest.mark.slow
def test_eval_every_steps_evaluates_between_epoch_ends_and_leaves_training_bit_identical(runs):
    every, plain = events(runs["every"][0]), events(runs["plain"][0])
    assert [e.step for e in every.Scalars("eval/top1")] == [3, 6, 8, 9, 12, 15, 16]
    assert [e.step for e in plain.Scalars("eval/top1")] == [8, 16]
    assert re.search(r"step 3 \(epoch 1, 3/8\) \| top-1 [\d.]+ \| top-5 [\d.]+ on 301 test images", runs["every"][1])
    # the same training figures, step for step, and the same weights and optimizer state at the end
    assert [e.value for e in every.Scalars("train/loss")] == [e.value for e in plain.Scalars("train/loss")]
    a, b = (load_checkpoint(runs[name][0] / "checkpoints" / "last.pt") for name in ("every", "plain"))
    assert a["step"] == b["step"] == 16 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k]))
                   for k, v in state.items())
    assert a["rng"].equal(b["rng"])  # the random generator, as the checkpoint records it


@pytest.mark.slow
def test_top5_per_class_and_the_confusion_matrix_in_the_event_files(runs):
    run_dir, stdout = runs["plain"]
    tb = events(run_dir)
    top1, top5 = ([e.value for e in tb.Scalars(f"eval/{k}")] for k in ("top1", "top5"))
    assert len(top5) == 2 and all(0 <= a <= b <= 1 for a, b in zip(top1, top5)) and top5[-1] > top1[-1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["top5"] == pytest.approx(top5[-1]) and metrics["top1"] == pytest.approx(top1[-1])
    per_class = {tag.split("/", 1)[1] for tag in tb.Tags()["scalars"] if tag.startswith("eval_class/")}
    assert len(per_class) == 10 and "Trouser" in per_class
    images = tb.Images("eval/confusion")
    assert [e.step for e in images] == [8, 16]
    picture = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert picture.shape == (250, 250, 3)  # 10 classes, 25 pixels a cell
    # the diagonal cells (right answers) are darker on average than the rest, after 2 epochs
    cells = picture[12::25, 12::25, 0].astype(float)
    assert np.diag(cells).mean() < cells[~np.eye(10, dtype=bool)].mean()
    assert re.search(r"worst classes \(top-1, test images\): \S.* [\d.]+ \(\d+\)", stdout)
    model = json.loads((run_dir / "model.json").read_text())
    assert model["num_classes"] == 10 and model["embedding_dim"] > 0 and model["checkpoints"]["last"]


def test_eta_follows_the_smoothed_step_time(caplog):
    """Pure: 0.5 s a step, then 1 s a step; the ETAs are the remaining steps times the moving average."""
    progress = Progress(epochs=2, bar=False)
    position = Position(batches_per_epoch=10)
    with caplog.at_level(logging.INFO, logger="recog"):
        for step in range(4):
            position.advance(step)
        progress.update(position, 4, 2.0, 1.0, 100.0, 0.05)  # 0.5 s a step: 6 + 10 steps left
        assert caplog.messages[-1] == ("step 4/20 | epoch 1/2 (4/10) | loss 1.0000 | 100 images/s | data wait 5.0% | "
                                       "epoch ETA 0:00:03 | run ETA 0:00:08")
        for step in range(4, 8):
            position.advance(step)
        progress.update(position, 4, 4.0, 1.0, 100.0, 0.05)  # 1 s a step: 0.7 * 0.5 + 0.3 * 1 = 0.65
        assert caplog.messages[-1].endswith(f"epoch ETA {duration(2 * 0.65)} | run ETA {duration(12 * 0.65)}")
    assert duration(None) == "?" and duration(3 * 86400 + 3725) == "3d 1:02:05"


def test_the_bar_on_a_terminal_and_the_lines_in_the_log_file(capsys, tmp_path):
    from recog.log import setup_logging

    root = logging.getLogger()
    kept, level = list(root.handlers), root.level
    setup_logging(tmp_path, is_main=True)
    progress = Progress(epochs=1, bar=True)
    position = Position(batches_per_epoch=10)
    for step in range(10):
        position.advance(step)
        if step in (4, 9):
            progress.update(position, 5, 1.0, 0.5, 200.0, 0.0)
    assert progress.bar is None  # closed at the run's last step
    captured = capsys.readouterr()
    assert "5/10" in captured.err and "epoch ETA 0:00:01" in captured.err and "step 5/10" not in captured.out
    logged = (tmp_path / "train.log").read_text()
    assert "step 5/10 | epoch 1/1 (5/10)" in logged and "step 10/10" in logged
    for handler in list(root.handlers):
        handler.close()
        root.removeHandler(handler)
    for handler in kept:
        root.addHandler(handler)
    root.setLevel(level)


def test_tally_top5_per_class_and_worst_classes():
    tally = Tally(torch.device("cpu"), num_classes=3, confusion_classes=3)
    labels, predicted = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 0])
    top = torch.stack([predicted, torch.tensor([1, 0, 0, 1, 1, 2])], dim=1)  # the second guess right for 2 more
    tally.add(labels, predicted, top)
    figures = tally.reduce()  # no process group: this rank's own
    assert figures["top1"] == 3 / 6 and figures["top5"] == 5 / 6 and figures["seen"] == 6
    correct, seen = figures["class_correct"], figures["class_seen"]
    assert correct.tolist() == [1, 1, 1] and seen.tolist() == [2, 1, 3]
    assert figures["confusion"].tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 1]]
    assert worst_classes(correct, seen, ["a", "b", "c"], 2) == "c 0.333 (3), a 0.500 (2)"
    assert Tally(torch.device("cpu"), 101, confusion_classes=100).reduce()["confusion"] is None  # O(classes²): off
    assert Tally(torch.device("cpu"), top5=False).reduce() == {"top1": 0.0, "seen": 0, "top5": None}
    image = confusion_image(figures["confusion"])
    assert image.shape == (3, 255, 255) and image[:, 0, 0].tolist() != image[:, 0, 255 - 1].tolist()
