"""weights= with a recog checkpoint trained on other classes (issue 29, item 3): the classifier, and a proxy loss's
proxies, are mapped by class name; new classes are imprinted from their training images on every rank.

Day 1: shards of 7 Fashion-MNIST classes, trained on briefly with train.py (ce_proxyanchor, so that its checkpoint
holds both a classifier and proxies). Day 2: 6 of those classes in another order, one dropped, and 3 new ones.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BUNDLED, ROOT, run_train, tiny_args
from PIL import Image

from recog.build import build_data, build_recipe
from recog.checkpoint import Checkpoints, load_checkpoint
from recog.data.idx import find_idx_pair
from recog.data.random_access import ShardRandomAccess
from recog.data.write import FASHION_MNIST_CLASSES, idx_records, write_shards
from recog.dist import Dist
from recog.errors import ConfigError
from recog.export import rebuild_model
from recog.imprint import choose_images, class_map, start_from_weights
from recog.model import RecognitionModel
from recog.rundir import compose_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONE_PROCESS = Dist(0, 0, 1, 1, torch.device("cpu"), None)
DAY1 = ["T-shirt/top", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Ankle boot"]
# day 1's classes in another order, "Shirt" gone, and three new ones among them
DAY2 = ["Sneaker", "Ankle boot", "Trouser", "Sandal", "Coat", "Dress", "Bag", "Pullover", "T-shirt/top"]
NEW = ["Sneaker", "Trouser", "Bag"]
NEW_TRAIN_IMAGES = 20  # of each new class in day 2's training shards: fewer than imprint_images, so all are chosen


def write_day(out: Path, split: str, names: list[str], start: int, stop: int, new_limit: int | None = None):
    """The bundled split's records [start, stop) of the classes `names`, labelled in `names`' order (at most
    `new_limit` of each NEW class)."""
    records, _ = idx_records(*find_idx_pair(BUNDLED, split), FASHION_MNIST_CLASSES)
    kept, seen = [], dict.fromkeys(names, 0)
    for record in records[start:stop]:
        name = FASHION_MNIST_CLASSES[record.label]
        if name in names and (new_limit is None or name not in NEW or seen[name] < new_limit):
            seen[name] += 1
            kept.append(replace(record, label=names.index(name)))
    return write_shards(kept, names, out, prefix=split, shard_samples=256, progress=False)


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("days")
    write_day(root / "day1", "train", DAY1, 0, 1500)
    write_day(root / "day1-test", "test", DAY1, 0, 300)
    write_day(root / "day2", "train", DAY2, 1500, 2500, new_limit=NEW_TRAIN_IMAGES)
    write_day(root / "day2-test", "test", DAY2, 300, 700)
    day1 = {"train": root / "day1", "test": root / "day1-test"}
    run = run_train(tiny_args(day1, **{"data.num_workers": 0, "loss": "ce_proxyanchor", "epochs": 2})
                    + [f"hydra.run.dir={root / 'run1'}"], root, nproc=None)
    assert run.returncode == 0, run.stderr[-3000:]
    return {**{k: root / k for k in ("day1", "day2", "day2-test")}, "last": root / "run1" / "checkpoints" / "last.pt",
            "root": root}


def day2_overrides(days, *extra: str) -> list[str]:
    return [f"{k}={v}" for k, v in {"data.train": days["day2"], "data.test": days["day2-test"], "data.prepare": "null",
                                   "data.num_workers": 0, "model.width": 16, "batch_size": 32}.items()] + list(extra)


def shard_images(folder: Path, classes: list[str]) -> dict[str, list[torch.Tensor]]:
    """Every image of a shard folder, by class name, read straight from the tar files (not through recog)."""
    found: dict[str, list[torch.Tensor]] = {name: [] for name in classes}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".png"):
                label = int(members[name[:-4] + ".cls"])
                pixels = np.array(Image.open(io.BytesIO(data)).convert("L"))
                found[classes[label]].append(torch.from_numpy(pixels)[None])
    return found


def embed(model: RecognitionModel, images: list[torch.Tensor], mean: list[float], std: list[float]) -> torch.Tensor:
    x = (torch.stack(images).float() / 255 - mean[0]) / std[0]
    with torch.no_grad():
        return F.normalize(model.eval().embed(model.backbone(x)), dim=1).double()


def expected_rows(days, mean, std) -> dict[str, torch.Tensor]:
    """Each new class's mean L2-normalised embedding by day 1's model, computed here from the tar files."""
    model = rebuild_model(load_checkpoint(days["last"]), days["last"])
    images = shard_images(days["day2"], DAY2)
    assert all(len(images[name]) == NEW_TRAIN_IMAGES for name in NEW)
    return {name: embed(model, images[name], mean, std).mean(dim=0) for name in NEW}


def check_rows(rows: torch.Tensor, saved: torch.Tensor, expected: dict[str, torch.Tensor]) -> None:
    """Kept classes: the very rows of day 1, at their new index; new ones: their imprinted means."""
    assert rows.shape == (len(DAY2), saved.shape[1])
    for i, name in enumerate(DAY2):
        if name in DAY1:
            assert torch.equal(rows[i], saved[DAY1.index(name)]), name
        else:
            assert torch.allclose(rows[i].double(), expected[name], atol=1e-5), name


def build(days, caplog, *extra: str):
    cfg = compose_train_config(*day2_overrides(days, f"weights={days['last']}", *extra))
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, ONE_PROCESS)
    with caplog.at_level(logging.INFO, logger="recog"):
        recipe = build_recipe(cfg, ONE_PROCESS, data)
    lines = [r.getMessage() for r in caplog.records if "mapped by class name" in r.getMessage()]
    return cfg, data, recipe, lines


def test_checkpoints_name_their_classes(days):
    assert load_checkpoint(days["last"])["classes"] == DAY1


def test_classifier_and_proxies_are_mapped_by_name_and_new_classes_imprinted(days, caplog):
    cfg, data, recipe, lines = build(days, caplog, "loss=ce_proxyanchor")
    assert data.classes == DAY2
    saved = load_checkpoint(days["last"])
    expected = expected_rows(days, list(cfg.data.mean), list(cfg.data.std))
    check_rows(recipe.model.class_weights.detach(), saved["model"]["class_weights"], expected)
    proxies = recipe.loss_fn.class_rows()["metric.proxies"].detach()
    check_rows(proxies, saved["loss"]["metric.proxies"], expected)
    assert lines == [f"weights {days['last']}: classifier mapped by class name (names from the checkpoint): 6 kept, "
                     "3 new (imprinted from up to 32 images each), 1 dropped; the loss's metric.proxies likewise"]
    # the optimizer starts fresh: weights= is not resume
    assert not recipe.optimizer.state


def test_arcface_class_rows_are_the_models_classifier(days, caplog):
    """loss=arcface has no class rows of its own: mapping the model's classifier is all there is to map."""
    cfg, _, recipe, lines = build(days, caplog, "loss=arcface")
    assert recipe.loss_fn.class_rows() == {} and not list(recipe.loss_fn.parameters())
    expected = expected_rows(days, list(cfg.data.mean), list(cfg.data.std))
    check_rows(recipe.model.class_weights.detach(), load_checkpoint(days["last"])["model"]["class_weights"], expected)
    assert len(lines) == 1 and lines[0].endswith("6 kept, 3 new (imprinted from up to 32 images each), 1 dropped")


@pytest.mark.parametrize("ranks", [1, 2])
def test_every_rank_holds_the_same_rows(days, tmp_path, ranks):
    """On real gloo ranks, each embedding its share of the chosen images: identical rows on every rank, before
    DDP copies rank 0's weights anywhere (each rank's fresh rows differ: weights_checks.py seeds by rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "tests" / "weights_checks.py"), str(tmp_path),
           *day2_overrides(days, f"weights={days['last']}", "loss=ce_proxyanchor")]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    held = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(ranks)]
    saved = load_checkpoint(days["last"])
    expected = expected_rows(days, held[0]["mean"], held[0]["std"])
    for rank in held:
        assert rank["classes"] == DAY2
        check_rows(rank["class_weights"], saved["model"]["class_weights"], expected)
        check_rows(rank["loss"]["metric.proxies"], saved["loss"]["metric.proxies"], expected)
        assert torch.equal(rank["class_weights"], held[0]["class_weights"])
        assert torch.equal(rank["loss"]["metric.proxies"], held[0]["loss"]["metric.proxies"])


def new_class_top1(recipe, days, mean, std) -> float:
    """Top-1 over day 2's classes of the test images of the new classes, by the model as built (before any step)."""
    images = shard_images(days["day2-test"], DAY2)
    model, hits, total = recipe.model.eval(), 0, 0
    for name in NEW:
        x = (torch.stack(images[name]).float() / 255 - mean[0]) / std[0]
        with torch.no_grad():
            hits += int((model(x).logits.argmax(dim=1) == DAY2.index(name)).sum())
        total += len(images[name])
    return hits / total


def test_imprinted_classes_are_recognised_from_the_first_step(days, caplog):
    """The new classes' top-1 (among day 2's 9 classes) before and after the first optimizer step: imprinted,
    against fresh rows (imprint_images=0)."""
    figures = {}
    for n in (32, 0):
        cfg, data, recipe, lines = build(days, caplog, f"imprint_images={n}")
        mean, std = list(cfg.data.mean), list(cfg.data.std)
        figures[n] = [new_class_top1(recipe, days, mean, std)]
        recipe.trained.train()
        recipe.step(next(data.batches(data.start())))
        figures[n].append(new_class_top1(recipe, days, mean, std))
    print(f"new classes' top-1 before / after the first step: imprinted {figures[32][0]:.3f} / {figures[32][1]:.3f}, "
          f"fresh {figures[0][0]:.3f} / {figures[0][1]:.3f}, chance {1 / len(DAY2):.3f}")
    assert lines[-1].endswith("3 new (starting fresh: imprint_images=0), 1 dropped")
    imprinted, fresh = figures[32][1], figures[0][1]
    assert imprinted >= 0.75 and imprinted >= fresh + 0.3, figures


def test_train_py_continues_on_two_ranks_and_says_what_it_mapped(days, tmp_path):
    run = run_train(day2_overrides(days, f"weights={days['last']}", "epochs=1", "data.num_workers=1",
                                   f"hydra.run.dir={tmp_path / 'run2'}"), tmp_path, nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() + run.stderr.splitlines() if "mapped by class name" in line]
    assert len(lines) == 1 and "6 kept, 3 new (imprinted from up to 32 images each), 1 dropped" in lines[0], lines
    assert load_checkpoint(tmp_path / "run2" / "checkpoints" / "last.pt")["classes"] == DAY2


# ---- the rules on their own: small models, no training ----

def tiny_checkpoint(classes: list[str] | None, rows: int, width: int = 8, train_dir: str | None = None) -> dict:
    torch.manual_seed(1)
    model = RecognitionModel("convnet", rows, in_channels=1, embedding_dim=width, width=4, blocks=(1, 1, 1))
    ckpt = {"model": model.state_dict(), "config": {"data": {"train": train_dir}}, "top1": 0.0, "best_top1": 0.0}
    return ckpt | ({"classes": classes} if classes is not None else {})


def load_into(ckpt: dict, classes: list[str], caplog, width: int = 8) -> tuple[RecognitionModel, list[str]]:
    torch.manual_seed(2)
    model = RecognitionModel("convnet", len(classes), in_channels=1, embedding_dim=width, width=4, blocks=(1, 1, 1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recog"):
        start_from_weights(ckpt, "w.pt", classes, model, torch.nn.Module(), None, 32, 0, ONE_PROCESS, lambda x: x)
    return model, [r.getMessage() for r in caplog.records]


def test_a_checkpoint_without_classes_takes_them_from_its_training_manifest(days, caplog):
    old = tiny_checkpoint(None, 7, train_dir=str(days["day1"]))
    model, lines = load_into(old, DAY2, caplog)
    assert lines == [f"weights w.pt: classifier mapped by class name (names from the manifest of {days['day1']}): "
                     "6 kept, 3 new (starting fresh: no training shards to imprint from), 1 dropped"]
    assert torch.equal(model.class_weights[DAY2.index("Coat")], old["model"]["class_weights"][DAY1.index("Coat")])


def test_a_checkpoint_without_names_of_as_many_classes_is_taken_in_the_same_order(tmp_path, caplog):
    old = tiny_checkpoint(None, 9, train_dir=str(tmp_path / "moved"))
    model, lines = load_into(old, DAY2, caplog)
    assert torch.equal(model.class_weights, old["model"]["class_weights"])
    assert "its 9 classes are taken to be this data's 9, in the same order" in lines[0]
    assert lines[1].endswith("(names assumed): 9 kept, 0 new, 0 dropped")


def test_a_checkpoint_without_names_of_another_number_of_classes_starts_the_classifier_fresh(tmp_path, caplog):
    old = tiny_checkpoint(None, 7, train_dir=str(tmp_path / "moved"))
    model, lines = load_into(old, DAY2, caplog)
    assert lines == ["weights w.pt: the weights' classifier is for 7 classes and this data has 9: the classifier "
                     "starts fresh, the rest is loaded"]
    assert torch.equal(model.embed.weight, old["model"]["embed.weight"])


def test_a_checkpoint_of_another_embedding_width_is_refused_in_one_sentence(caplog):
    with pytest.raises(ConfigError, match=r"^the weights make 8-d embeddings and this model 16-d ones; set "
                                          r"model\.embedding_dim=8 to start from them\.$"):
        load_into(tiny_checkpoint(DAY1, 7), DAY2, caplog, width=16)


def test_imprint_images_must_be_a_number(caplog):
    model = RecognitionModel("convnet", 9, in_channels=1, embedding_dim=8, width=4, blocks=(1, 1, 1))
    with pytest.raises(ConfigError, match="imprint_images=-1 is not a number of images"):
        start_from_weights(tiny_checkpoint(DAY1, 7), "w.pt", DAY2, model, torch.nn.Module(), None, -1, 0,
                           ONE_PROCESS, lambda x: x)


def test_the_chosen_images_are_a_seeded_choice_of_each_new_class():
    labels = np.repeat(np.arange(4), [50, 3, 0, 40])
    chosen = choose_images(labels, [0, 1, 2, 3], 8, seed=5)
    assert [len(chosen[c]) for c in range(4)] == [8, 3, 0, 8]
    assert all((labels[chosen[c]] == c).all() and (np.diff(chosen[c]) > 0).all() for c in range(4))
    assert all(np.array_equal(chosen[c], choose_images(labels, [c], 8, seed=5)[c]) for c in (0, 3))  # on its own
    assert not np.array_equal(chosen[0], choose_images(labels, [0], 8, seed=6)[0])


def test_a_class_map_counts_kept_new_and_dropped():
    mapping, note = class_map(tiny_checkpoint(DAY1, 7), DAY2)
    assert note is None and mapping.names_from == "names from the checkpoint"
    assert [DAY2[i] for i in mapping.new] == NEW and mapping.dropped == ("Shirt",) and len(mapping.kept) == 6
    assert all(DAY1[mapping.source[i]] == DAY2[i] for i in mapping.kept)


def test_checkpoints_save_the_classes_given(tmp_path):
    from omegaconf import OmegaConf
    settings = OmegaConf.create({"keep": 1, "every_steps": 0, "every_minutes": 0})
    path = Checkpoints(settings, tmp_path, True, {}, config={}, classes=DAY2).save(1)
    assert load_checkpoint(path)["classes"] == DAY2


def test_a_new_class_without_a_training_image_starts_fresh_and_is_named(tmp_path, caplog):
    records, _ = idx_records(*find_idx_pair(BUNDLED, "train"), FASHION_MNIST_CLASSES)
    two = [replace(r, label=["Bag", "Coat"].index(FASHION_MNIST_CLASSES[r.label])) for r in records[:200]
           if FASHION_MNIST_CLASSES[r.label] in ("Bag", "Coat")]
    classes = ["Bag", "Coat", "Sneaker"]  # no Sneaker among these images
    manifest = write_shards(two, classes, tmp_path / "shards", shard_samples=64, progress=False)
    torch.manual_seed(2)
    model = RecognitionModel("convnet", 3, in_channels=1, embedding_dim=8, width=4, blocks=(1, 1, 1))
    fresh = model.class_weights.detach().clone()
    with caplog.at_level(logging.INFO, logger="recog"):
        start_from_weights(tiny_checkpoint(["Coat", "Shirt"], 2), "w.pt", classes, model, torch.nn.Module(),
                           partial(ShardRandomAccess, manifest), 4, 0, ONE_PROCESS, lambda x: x.float() / 255)
    assert caplog.records[-1].getMessage() == (
        "weights w.pt: classifier mapped by class name (names from the checkpoint): 1 kept, 2 new (1 imprinted from "
        "up to 4 images each; 1 with no training image start fresh: 'Sneaker'), 1 dropped")
    assert torch.equal(model.class_weights[2], fresh[2]) and not torch.equal(model.class_weights[0], fresh[0])


def test_an_old_checkpoints_class_names_are_read_where_the_weights_are_read(days, tmp_path, caplog):
    """Rank 0 reads weights= and settles the names of its rows (read_weights): every rank is handed them with the
    weights, so a manifest on rank 0's disk alone maps the rows alike on every rank. Moved since: not read again."""
    from recog.imprint import read_weights

    old = tiny_checkpoint(None, 7, train_dir=str(days["day1"]))
    torch.save(old, tmp_path / "w.pt")
    weights = read_weights(str(tmp_path / "w.pt"))
    assert weights["trained_classes"] == (DAY1, f"manifest of {days['day1']}")
    weights["config"]["data"]["train"] = str(tmp_path / "moved")  # what another node's disk would say
    mapping, _ = class_map(weights, DAY2)
    assert mapping.names_from == f"names from the manifest of {days['day1']}" and len(mapping.kept) == 6
