"""model.classifier=auto: settled from the training classes (recog.config.settle_classifier), and for real under
torchrun with 2 processes: 10 classes train replicated, 100,000 sharded (each process writes its rows' file)."""

import dataclasses

import pytest
from conftest import BUNDLED, run_train, tiny_args
from omegaconf import OmegaConf

from recog.checkpoint import load_checkpoint
from recog.config import AUTO_SHARDED_CLASSES, check_classifier, keep_resumed_classifier, settle_classifier
from recog.data.idx import find_idx_pair
from recog.data.write import idx_records, numbered_classes, write_shards
from recog.errors import ConfigError
from recog.rundir import compose_train_config


def config(*overrides):
    return compose_train_config("data.train=/x", "data.test=/y", "model.classifier=auto", *overrides)


@pytest.mark.parametrize("classes, overrides, choice, words", [
    (10, [], "replicated", "10 classes, under 100,000"),
    (AUTO_SHARDED_CLASSES - 1, [], "replicated", "99,999 classes, under 100,000"),
    (AUTO_SHARDED_CLASSES, [], "sharded", "100,000 classes, at least 100,000"),
    (AUTO_SHARDED_CLASSES, ["loss.sample_rate=0.1"], "sharded", "100,000 classes"),
    (1_000_000, ["perf.compile=true"], "replicated", "not sharded: perf.compile=true would compile"),
])
def test_auto_settles_by_the_class_count_and_says_why(classes, overrides, choice, words):
    cfg = config(*overrides)
    check_classifier(cfg)  # auto is not refused for what sharded does not do: it then picks replicated
    line = settle_classifier(cfg, classes)
    assert cfg.model.classifier == choice
    assert line.startswith(f"model.classifier=auto: {choice} (") and words in line


def test_sampling_where_auto_picks_replicated_is_one_sentence():
    cfg = config("loss.sample_rate=0.1")
    with pytest.raises(ConfigError, match=r"^loss.sample_rate=0.1 samples .*=auto chose replicated \(10 classes, "
                                          r"under 100,000\); set model.classifier=sharded, or loss.sample_rate=1.0.$"):
        settle_classifier(cfg, 10)


def test_a_set_classifier_is_left_alone():
    cfg = config("model.classifier=replicated")
    assert settle_classifier(cfg, 5_000_000) is None and cfg.model.classifier == "replicated"


def test_an_unknown_classifier_names_auto_among_the_choices():
    with pytest.raises(ConfigError, match="model.classifier=split is unknown; use replicated .*, sharded .* or auto"):
        check_classifier(config("model.classifier=split"))


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory):
    """128 training and 64 test images of Fashion-MNIST, labelled with classes spread over 0..99,999 (both ends
    included): shards that name 100,000 classes."""
    root = tmp_path_factory.mktemp("many")
    for split, count in (("train", 128), ("test", 64)):
        records, _ = idx_records(*find_idx_pair(BUNDLED, split), None)
        spread = [dataclasses.replace(r, label=round(i * (AUTO_SHARDED_CLASSES - 1) / (count - 1)))
                  for i, r in enumerate(records[:count])]
        write_shards(spread, numbered_classes(AUTO_SHARDED_CLASSES), root / split, prefix=split, progress=False)
    return {"train": root / "train", "test": root / "test"}


@pytest.mark.slow
def test_auto_trains_sharded_from_100k_classes_and_replicated_below(many_classes, tiny_data, tmp_path):
    sharded = run_train(tiny_args(many_classes, **{"model.classifier": "auto", "log_every": 1}) +
                        [f"hydra.run.dir={tmp_path / 'many'}"], cwd=tmp_path, nproc=2)
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    assert "model.classifier=auto: sharded (100,000 classes, at least 100,000)" in sharded.stdout + sharded.stderr
    rows = {p.name for p in (tmp_path / "many" / "checkpoints").glob("step-*.rows/*")}
    assert {"rows-0000000000-0000050000.safetensors", "rows-0000050000-0000100000.safetensors"} <= rows
    assert OmegaConf.load(tmp_path / "many" / ".hydra" / "config.yaml").model.classifier == "auto"  # as given
    saved = load_checkpoint(tmp_path / "many" / "checkpoints" / "last.pt")
    assert saved["config"]["model"]["classifier"] == "sharded"  # the checkpoint records what auto chose

    replicated = run_train(tiny_args(tiny_data, **{"model.classifier": "auto"}) + [f"hydra.run.dir={tmp_path / 'few'}"],
                           cwd=tmp_path, nproc=2)
    assert replicated.returncode == 0, replicated.stdout + replicated.stderr
    assert "model.classifier=auto: replicated (10 classes, under 100,000)" in replicated.stdout + replicated.stderr
    assert not list((tmp_path / "few" / "checkpoints").glob("*.rows"))


def test_sampling_where_auto_cannot_shard_names_the_setting_and_both_fixes():
    cfg = config("loss.sample_rate=0.1", "perf.compile=true")
    with pytest.raises(ConfigError, match=r"^perf.compile=true would compile .*; set perf.compile=false with "
                                          r"model.classifier=sharded; or set loss.sample_rate=1.0 to train replicated "
                                          r"\(model.classifier=auto, 200,000 classes\).$"):
        settle_classifier(cfg, 200_000)


@pytest.mark.parametrize("saved, overrides, choice", [
    ("sharded", [], "sharded"),
    ("replicated", [], "replicated"),  # whatever the classes would settle
    (None, [], "auto"),  # a checkpoint that does not say: settled from the classes, as on a first run
])
def test_a_resume_keeps_what_auto_chose(saved, overrides, choice):
    cfg = config(*overrides)
    state = {"config": {"model": {"classifier": saved}}} if saved else {"config": {"model": {}}}
    line = keep_resumed_classifier(cfg, state)
    assert cfg.model.classifier == choice
    assert line == (f"model.classifier=auto: {saved}, as the checkpoint it continues was trained" if saved else None)
    assert settle_classifier(cfg, 1_000_000 if saved == "replicated" else 10) is None or saved is None


def test_a_resume_of_a_sharded_choice_with_a_setting_sharded_refuses_is_its_sentence():
    cfg = config("perf.compile=true")  # auto alone would now pick replicated, whose checkpoint this is not
    with pytest.raises(ConfigError, match=r"^perf.compile=true would compile the sharded classifier's collectives"):
        keep_resumed_classifier(cfg, {"config": {"model": {"classifier": "sharded"}}})
