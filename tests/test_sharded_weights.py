"""weights= into model.classifier=sharded (issue 30, the growing catalogue): each process fills only its slice of
this run's classes, kept classes' rows read by name from the checkpoint (only the rows its slice maps to, from a
sharded checkpoint's folder; or a replicated checkpoint's class_weights), new classes imprinted.

Day 1: 7 Fashion-MNIST classes, their names sorted, trained on for one epoch by train.py with a sharded classifier
on 2 processes (rows 0-3 in one slice file, 4-6 in the other). Day 2: 3 new classes whose names sort in between
("Bag", "Sneaker", "Trouser"), "Shirt" dropped: most kept classes move to another row, some to another process.
Day 2's step recipe is built as train.py builds it (tests/weights_checks.py) on 2 processes and on 1, and each
process's rows are compared with day 1's by name and with the replicated classifier's imprinting. From a replicated
checkpoint (day 1's, its rows put in the model), each of 2 ranks' slices is filled in this process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_train, tiny_args
from hydra.utils import instantiate
from test_weights_by_name import NEW, NEW_TRAIN_IMAGES, shard_images, write_day

from recog import classifier_files, imprint
from recog.build import build_data, build_recipe, shard_source
from recog.checkpoint import load_checkpoint
from recog.config import check_config
from recog.data.decode import decode_image
from recog.data.normalize import Normalize
from recog.data.random_access import ShardRandomAccess
from recog.dist import Dist
from recog.errors import ConfigError
from recog.export import rebuild_model
from recog.rundir import compose_train_config
from recog.sharded import ShardedClassifier, ShardedLoss, class_slice

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ONE_PROCESS = Dist(0, 0, 1, 1, torch.device("cpu"), None)
DAY1 = ["Ankle boot", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "T-shirt/top"]
DAY2 = ["Ankle boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Sneaker", "T-shirt/top", "Trouser"]
assert sorted(NEW) == [name for name in DAY2 if name not in DAY1] and DAY1 == sorted(DAY1) and DAY2 == sorted(DAY2)
KEPT = [name for name in DAY2 if name in DAY1]
NOTE = "classifier mapped by class name (names from the checkpoint): 6 kept, 3 new (imprinted from up to 32 images " \
       "each), 1 dropped"
IMPRINTED = 1e-5  # a new class's row against the replicated path's (float64 sums over other splits, then fp32)


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("days")
    write_day(root / "day1", "train", DAY1, 0, 1500)
    write_day(root / "day1-test", "test", DAY1, 0, 200)
    write_day(root / "day2", "train", DAY2, 1500, 2500, new_limit=NEW_TRAIN_IMAGES)
    write_day(root / "day2-test", "test", DAY2, 300, 700)
    day1 = {"train": root / "day1", "test": root / "day1-test"}
    run = run_train(tiny_args(day1, **{"data.num_workers": 0, "model.classifier": "sharded"})
                    + [f"hydra.run.dir={root / 'run1'}"], root, nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    last = root / "run1" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    folder = last.parent / ckpt["classifier_rows"]
    layout = classifier_files.read_layout(folder)
    assert [(f["start"], f["stop"]) for f in layout["files"]] == [(0, 4), (4, 7)]  # a slice file per process
    rows = classifier_files.read_rows(folder, range(len(DAY1)), total=len(DAY1))["weight"].clone()
    # the same weights as a replicated classifier's checkpoint: the rows in the model, no folder
    replicated = {"model": {**ckpt["model"], "class_weights": rows},
                  "config": {**ckpt["config"], "model": {**ckpt["config"]["model"], "classifier": "replicated"}},
                  "classes": ckpt["classes"]}
    torch.save(replicated, root / "replicated.pt")
    return {"root": root, "last": last, "replicated": root / "replicated.pt", "rows": rows, "day2": root / "day2",
            "day2-test": root / "day2-test"}


def day2_overrides(days, *extra: str) -> list[str]:
    return [f"{k}={v}" for k, v in {"data.train": days["day2"], "data.test": days["day2-test"], "data.prepare": "null",
                                   "data.num_workers": 0, "model.width": 16, "batch_size": 32}.items()] + list(extra)


@pytest.fixture(scope="module")
def expected(days) -> torch.Tensor:
    """Day 2's rows as the replicated classifier takes them from the sharded checkpoint (one process, which reads
    the whole folder): test_weights_by_name.py checks that path against the images' means computed from the tars."""
    cfg = compose_train_config(*day2_overrides(days, f"weights={days['last']}"))
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, ONE_PROCESS)
    assert data.classes == DAY2
    return build_recipe(cfg, ONE_PROCESS, data).model.class_weights.detach().clone()


def build_on(days, tmp_path: Path, ranks: int, weights: Path) -> tuple[torch.Tensor, list[dict], str]:
    """Day 2's recipe built on `ranks` gloo processes from `weights`: the whole classifier put together from the
    processes' slices, what each saved, and their log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "tests" / "weights_checks.py"), str(tmp_path),
           *day2_overrides(days, f"weights={weights}", "model.classifier=sharded")]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    held = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(ranks)]
    for r, rank in enumerate(held):  # contiguous slices, in rank order, covering every class once
        piece = class_slice(r, ranks, len(DAY2))
        assert rank["classes"] == DAY2 and rank["held"] == [piece.start, piece.stop]
        assert len(rank["rows"]) == len(piece)
    return torch.cat([h["rows"] for h in held]), held, run.stderr


def check_rows(rows: torch.Tensor, day1_rows: torch.Tensor, expected: torch.Tensor) -> None:
    """Kept classes: day 1's very row for that name; new ones: imprinted (the replicated path's mean embedding)."""
    assert rows.shape == (len(DAY2), day1_rows.shape[1])
    for i, name in enumerate(DAY2):
        if name in DAY1:
            assert torch.equal(rows[i], day1_rows[DAY1.index(name)]), name
        else:
            assert rows[i].abs().max() > 0.01 and (rows[i] - expected[i]).abs().max() < IMPRINTED, name
    assert torch.equal(rows[[DAY2.index(n) for n in KEPT]], expected[[DAY2.index(n) for n in KEPT]])


def old_class_predictions(model, rows: torch.Tensor, classes: list[str], days, held: dict) -> list[str]:
    """The class (a name among the kept ones) `model` and `rows` give each day-2 test image of a kept class."""
    images = shard_images(days["day2-test"], DAY2)
    x = torch.stack([image for name in KEPT for image in images[name]]).float() / 255
    with torch.no_grad():
        embeddings = F.normalize(model.eval().embed(model.backbone((x - held["mean"][0]) / held["std"][0])), dim=1)
    keep = [classes.index(name) for name in KEPT]
    scores = embeddings @ F.normalize(rows[keep], dim=1).t()
    return [KEPT[i] for i in scores.argmax(dim=1).tolist()]


@pytest.mark.parametrize("ranks", [2, 1])
def test_each_process_fills_its_slice_by_class_name(days, expected, tmp_path, ranks):
    """Day 2 on 2 processes (rank 0: Ankle boot .. Pullover, rank 1: Sandal .. Trouser: "Sandal" and "T-shirt/top"
    come from day 1's second file, rank 0's rows from its first) and on 1 (both files into one slice)."""
    rows, held, log = build_on(days, tmp_path, ranks, days["last"])
    check_rows(rows, days["rows"], expected)
    assert NOTE in log, log[-3000:]
    # before any step the model is day 1's, and so are the kept rows: top-1 among the old classes is unchanged
    day1 = rebuild_model(load_checkpoint(days["last"]), days["last"])
    assert all(torch.equal(value, day1.state_dict()[key]) for key, value in held[0]["model"].items())
    before = old_class_predictions(day1, days["rows"], DAY1, days, held[0])
    model = rebuild_model({**load_checkpoint(days["last"]), "model": held[0]["model"]}, days["last"])
    assert old_class_predictions(model, rows, DAY2, days, held[0]) == before
    truth = [name for name in KEPT for _ in shard_images(days["day2-test"], DAY2)[name]]
    print(f"top-1 among the {len(KEPT)} kept classes before day 2's first step: "
          f"{np.mean([a == b for a, b in zip(before, truth)]):.3f} (chance {1 / len(KEPT):.3f}), as on day 1")
    swapped = rows.clone()  # two kept classes' rows exchanged, one of them the most predicted: the comparison can fail
    most = max(set(before), key=before.count)
    a, b = DAY2.index(most), DAY2.index(next(name for name in KEPT if name != most))
    swapped[[a, b]] = swapped[[b, a]]
    assert old_class_predictions(model, swapped, DAY2, days, held[0]) != before


def test_a_replicated_checkpoint_into_a_sharded_run(days, expected, caplog):
    """The rows from model["class_weights"] (every process is handed the checkpoint): each of 2 ranks' slices,
    filled in one process (the collectives of imprinting are tested above), the rows the sharded checkpoint they
    were copied from gives."""
    cfg = compose_train_config(*day2_overrides(days, f"weights={days['replicated']}", "model.classifier=sharded"))
    data = build_data(cfg, ONE_PROCESS)
    weights = imprint.read_weights(str(days["replicated"]))
    assert "classifier_folder" not in weights and weights["trained_classes"][0] == DAY1
    slices = []
    with caplog.at_level(logging.INFO, logger="recog"):
        for rank in range(2):
            model = instantiate(cfg.model, num_classes=len(DAY2), in_channels=cfg.data.channels)
            loss = ShardedLoss(ShardedClassifier(len(DAY2), cfg.model.embedding_dim, rank, 2, seed=cfg.seed))
            images = partial(ShardRandomAccess, data.train_manifest, shard_source(cfg.data),
                             instantiate(cfg.augment.test), cfg.data.channels, decode_image)
            normalize = Normalize(cfg.data.mean, cfg.data.std, torch.device("cpu"))
            imprint.start_from_weights(weights, "replicated.pt", DAY2, model, loss, images, cfg.imprint_images,
                                       cfg.seed, ONE_PROCESS, normalize)
            slices.append(loss.classifier.weight.detach())
    check_rows(torch.cat(slices), days["rows"], expected)
    assert sum(NOTE in r.getMessage() for r in caplog.records) == 2


def test_a_proxy_loss_beside_sharded_rows_takes_its_proxies_by_name(days, expected, caplog):
    """loss=ce_proxyanchor with model.classifier=sharded: the proxies (every class's, on every process) are mapped
    by class name and the new classes' imprinted, as the replicated path does, beside this process's slice of rows."""
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    weights = imprint.read_weights(str(days["replicated"]))
    saved = torch.randn(len(DAY1), days["rows"].shape[1])
    weights["loss"] = {"metric.proxies": saved}
    cfg = compose_train_config(*day2_overrides(days, "model.classifier=sharded"))
    data = build_data(cfg, ONE_PROCESS)
    model = instantiate(cfg.model, num_classes=len(DAY2), in_channels=cfg.data.channels)
    metric = ProxyAnchorLoss(num_classes=len(DAY2), embedding_size=cfg.model.embedding_dim)
    loss = ShardedLoss(ShardedClassifier(len(DAY2), cfg.model.embedding_dim, 1, 2, seed=cfg.seed), metric=metric,
                       metric_weight=1.0)
    images = partial(ShardRandomAccess, data.train_manifest, shard_source(cfg.data), instantiate(cfg.augment.test),
                     cfg.data.channels, decode_image)
    normalize = Normalize(cfg.data.mean, cfg.data.std, torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="recog"):
        imprint.start_from_weights(weights, "replicated.pt", DAY2, model, loss, images, cfg.imprint_images, cfg.seed,
                                   ONE_PROCESS, normalize)
    proxies = metric.proxies.detach()
    for i, name in enumerate(DAY2):
        if name in DAY1:
            assert torch.equal(proxies[i], saved[DAY1.index(name)]), name
        else:  # imprinted as the classifier's row is
            assert (proxies[i] - expected[i]).abs().max() < IMPRINTED, name
    assert any("the loss's metric.proxies likewise" in r.getMessage() for r in caplog.records)


def test_weights_with_a_sharded_classifier_is_no_longer_refused(days):
    check_config(compose_train_config(*day2_overrides(days, f"weights={days['last']}", "model.classifier=sharded")))


def test_a_sharded_checkpoint_without_its_rows_folder_is_refused_in_one_sentence(days, tmp_path):
    alone = tmp_path / "last.pt"
    alone.write_bytes(days["last"].read_bytes())
    with pytest.raises(ConfigError, match=r"the classifier folder .*step-\d+\.rows does not exist; give the "
                                          "checkpoint it was saved with"):
        imprint.read_weights(str(alone))


def test_a_rank_reads_a_few_spans_of_the_rows_it_needs(tmp_path, monkeypatch):
    """saved_rows: the rows asked for (any order), read as contiguous spans, a small gap read through, a large one
    not; the optimizer state left unread."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 3, generator=g)
    folder = tmp_path / "rows"
    for piece in (range(0, 20), range(20, 40)):
        classifier_files.write_slice(folder, {"weight": weight[piece.start:piece.stop],
                                              "exp_avg": torch.zeros(len(piece), 3)}, piece, 40)
    classifier_files.finish(folder, 40, ["weight", "exp_avg"])
    weights = {"model": {}, "classifier_folder": {"path": str(folder), "total": 40, "width": 3, "dtype": "F32"}}
    calls = []
    read = classifier_files.read_rows

    def recorded(*args, **kwargs):
        calls.append((args[1], kwargs.get("names")))
        return read(*args, **kwargs)

    monkeypatch.setattr(classifier_files, "read_rows", recorded)
    monkeypatch.setattr(imprint, "GAP_ROWS", 4)
    wanted = [18, 3, 4, 21, 6, 35, 36]
    assert torch.equal(imprint.saved_rows(weights, wanted), weight[wanted])
    assert calls == [(range(3, 7), ["weight"]), (range(18, 22), ["weight"]), (range(35, 37), ["weight"])]
    assert imprint.spans(np.array([], dtype=np.int64), 4) == []


def test_a_sharded_checkpoint_into_a_replicated_run_reads_every_row(days, expected, caplog):
    """The replicated classifier holds every row anyway: it reads the whole folder (the `expected` fixture)."""
    check_rows(expected, days["rows"], expected)
    with caplog.at_level(logging.INFO, logger="recog"):
        cfg = compose_train_config(*day2_overrides(days, f"weights={days['last']}", "imprint_images=0"))
        build_recipe(cfg, ONE_PROCESS, build_data(cfg, ONE_PROCESS))
    assert any("6 kept, 3 new (starting fresh: imprint_images=0), 1 dropped" in r.getMessage() for r in caplog.records)
