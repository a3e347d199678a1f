"""What the images are (channels, size, mean/std) is measured by the shard writer and used by data=images;
the augmentation preset follows the images' size. Real shards, the real composed config."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BUNDLED
from PIL import Image

from recog.config import settle_data_settings
from recog.data.idx import find_idx_pair, read_idx
from recog.data.manifest import load_manifest
from recog.data.write import folder_records, write_shards
from recog.rundir import compose_train_config


def settle(cfg, manifest) -> str:
    """The data settings settled from `manifest` and written into `cfg`, as recog.build.build_data does."""
    settings = settle_data_settings(cfg, manifest, None)
    settings.write_into(cfg)
    return settings.line


def test_the_writer_records_channels_size_and_statistics(tiny_data):
    stats = load_manifest(tiny_data["train"]).stats
    pixels = read_idx(find_idx_pair(BUNDLED, "train")[0])[:1000] / 255.0  # the images tiny_data holds
    assert stats["channels"] == 1 and stats["sampled"] == 1000
    assert stats["height"] == stats["width"] == {"min": 28, "median": 28, "max": 28}
    assert stats["mean"] == pytest.approx([pixels.mean()], abs=1e-4)
    assert stats["std"] == pytest.approx([pixels.std()], abs=1e-4)


def photos(root, sizes, classes=2, per_class=4):
    """Real JPEG files: random RGB photos of the given (width, height) sizes."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[(c * per_class + i) % len(sizes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c] = 200  # the two classes differ in colour
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def test_large_rgb_photos_get_imagenet_style_defaults(tmp_path):
    photos(tmp_path / "src", [(300, 240), (256, 256), (240, 320)])
    records, classes = folder_records(tmp_path / "src")
    stats = write_shards(records, classes, tmp_path / "shards", progress=False).stats
    assert stats["channels"] == 3 and stats["height"] == {"min": 240, "median": 256, "max": 320}
    cfg = compose_train_config("data=images", f"data.train={tmp_path / 'shards'}", f"data.test={tmp_path / 'shards'}")
    line = settle(cfg, load_manifest(tmp_path / "shards"))
    assert cfg.data.channels == 3 and cfg.data.image_size == 224  # the median is 256: capped at 224
    assert list(cfg.data.mean) == stats["mean"] and list(cfg.data.std) == stats["std"] and len(stats["std"]) == 3
    assert cfg.augment.name == "imagenet" and "augment=imagenet (flip 0.5) for that size" in line
    import torch
    from hydra.utils import instantiate

    image = torch.randint(0, 256, (3, 240, 300), dtype=torch.uint8)
    assert instantiate(cfg.augment.train)(image).shape == instantiate(cfg.augment.test)(image).shape == (3, 224, 224)


def test_small_grey_images_get_the_small_preset_and_overrides_win(tiny_data):
    manifest = load_manifest(tiny_data["train"])
    cfg = compose_train_config(f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}")
    line = settle(cfg, manifest)
    assert (cfg.data.channels, cfg.data.image_size, cfg.augment.name) == (1, 28, "small")
    assert (cfg.augment.pad, cfg.augment.flip) == (4, 0.5) and "pad 4, flip 0.5" in line
    # what a user sets is kept: no flip (digits), RGB decoding (the grey mean repeated), another size
    cfg = compose_train_config(f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}", "augment.flip=0",
                               "data.channels=3", "data.image_size=32")
    settle(cfg, manifest)
    assert cfg.augment.flip == 0 and cfg.data.image_size == 32 and list(cfg.data.mean) == manifest.stats["mean"] * 3
    cfg = compose_train_config(f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}", "augment=none")
    settle(cfg, manifest)
    assert cfg.augment.name == "none"


def test_settling_returns_the_values_and_leaves_the_config_as_it_is(tiny_data):
    cfg = compose_train_config(f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}")
    settings = settle_data_settings(cfg, load_manifest(tiny_data["train"]), None)
    assert (settings.channels, settings.image_size, settings.augment["name"], settings.augment["pad"]) == (
        1, 28, "small", 4)
    assert (cfg.data.channels, cfg.data.image_size, cfg.augment.name, cfg.augment.pad) == ("auto",) * 4


def test_tiny_solid_colour_images_keep_a_shift_and_a_usable_std(tmp_path):
    # 8x8 images (sklearn's digits are this size): a 4 px shift would move half the image away
    for c, value in enumerate((100, 104)):
        (tmp_path / "src" / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / "src" / f"class{c}" / f"{i}.png")
    records, classes = folder_records(tmp_path / "src")
    stats = write_shards(records, classes, tmp_path / "shards", progress=False).stats
    cfg = compose_train_config("data=images", f"data.train={tmp_path / 'shards'}", f"data.test={tmp_path / 'shards'}")
    line = settle(cfg, load_manifest(tmp_path / "shards"))
    assert (cfg.data.image_size, cfg.augment.name, cfg.augment.pad) == (8, "small", 1) and "pad 1" in line
    # two solid greys 4 levels apart: std 2/255, which would scale the pixels up 128x; floored at 0.05
    assert stats["std"][0] == pytest.approx(2 / 255, abs=1e-4) and cfg.data.std == [0.05]
    cfg = compose_train_config("data=images", f"data.train={tmp_path / 'shards'}", f"data.test={tmp_path / 'shards'}",
                               "augment=small", "augment.pad=2")
    settle(cfg, load_manifest(tmp_path / "shards"))
    assert cfg.augment.pad == 2


def test_shards_without_statistics_are_measured_at_start(tiny_data, tmp_path):
    import shutil

    shutil.copytree(tiny_data["train"], tmp_path / "train")
    raw = json.loads((tmp_path / "train" / "manifest.json").read_text())
    del raw["stats"]  # as written by another tool, or by recog before it recorded them
    (tmp_path / "train" / "manifest.json").write_text(json.dumps(raw))
    cfg = compose_train_config(f"data.train={tmp_path / 'train'}", f"data.test={tiny_data['test']}")
    settle(cfg, load_manifest(tmp_path / "train"))
    full = load_manifest(tiny_data["train"]).stats
    assert (cfg.data.channels, cfg.data.image_size) == (1, 28)
    assert cfg.data.mean[0] == pytest.approx(full["mean"][0], abs=0.02)
    assert cfg.data.std[0] == pytest.approx(full["std"][0], abs=0.02)
