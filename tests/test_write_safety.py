"""The shard writer never deletes what it did not write, and never writes an image it cannot decode."""

import hashlib
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recog.data.__main__ import main as data_cli
from recog.data.decode import decode_sample
from recog.data.manifest import load_manifest
from recog.data.plan import Piece
from recog.data.stream import read_pieces


def make_images(src: Path, bad: bool = False) -> None:
    """Two classes of small images; with `bad`, a garbage .png and a truncated .jpg among them."""
    for c, name in enumerate(("bag", "shoe")):
        (src / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 12), (60 * c, 30 * i, 9)).save(src / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    if bad:
        (src / "bag" / "garbage.png").write_bytes(os.urandom(300))
        good = (src / "shoe" / "0.jpg").read_bytes()
        (src / "shoe" / "cut.jpg").write_bytes(good[: len(good) // 2])


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tmp_files(out: Path) -> list[str]:
    return [name for _, _, names in os.walk(out) for name in names if ".tmp" in name]


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink", "list"])
def test_overwrite_refuses_the_source_and_deletes_nothing(tmp_path, where, capsys):
    src = tmp_path / "data" / "imgs"
    make_images(src)
    (tmp_path / "data" / "readme.txt").write_text("mine")
    out = {"same": src, "parent": tmp_path / "data", "inside": src / "shards", "symlink": tmp_path / "link",
           "list": src / "bag"}[where]
    if where == "symlink":
        out.symlink_to(src)
    before = digests(tmp_path / "data")
    if where == "list":  # a list file naming images in the output folder
        (tmp_path / "list.tsv").write_text("".join(f"data/imgs/bag/{i}.{'png' if i % 2 else 'jpg'}\tbag\n"
                                                   for i in range(4)))
        code = data_cli(["write", "list", str(tmp_path / "list.tsv"), str(out), "--overwrite"])
    else:
        code = data_cli(["write", "folder", str(src), str(out), "--overwrite"])
    assert code == 2 and "source" in capsys.readouterr().err
    assert digests(tmp_path / "data") == before


def test_overwrite_replaces_only_recogs_own_files(tmp_path):
    make_images(tmp_path / "src")
    out = tmp_path / "out"
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--shard-samples", "2"]) == 0
    assert len(load_manifest(out).shards) == 4
    (out / "notes.txt").write_text("my notes")
    (out / ".shard-000009.tar.tmp").write_bytes(b"left by a killed write")
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["index.npz", "manifest.json", "notes.txt", "shard-000000.tar"]
    assert (out / "notes.txt").read_text() == "my notes" and load_manifest(out).shard_sizes == [8]


def test_a_file_named_like_a_shard_is_never_replaced(tmp_path, capsys):
    make_images(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"my own tar")
    (out / "notes.txt").write_text("my notes")
    before = digests(out)
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "shard-000000.tar" in err and "move it away" in err
    assert digests(out) == before


def written_samples(out: Path) -> list[tuple]:
    """Every sample as training reads it: decoded (raises if it cannot be) and its label."""
    manifest = load_manifest(out)
    pieces = [Piece(i, 0, n) for i, n in enumerate(manifest.shard_sizes)]
    return [decode_sample(s, 3) for s in read_pieces(manifest, pieces, strict=True)]


@pytest.mark.parametrize("reencode", [[], ["--reencode", "jpg"]])
def test_unreadable_images_are_skipped_named_and_counted(tmp_path, caplog, capsys, reencode):
    make_images(tmp_path / "src", bad=True)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--shard-samples", "3", "--no-shuffle",
                         *reencode]) == 0  # the folder's order: which shard held cut.jpg is known
    assert "Traceback" not in capsys.readouterr().err
    assert "garbage.png" in caplog.text and "cut.jpg" in caplog.text
    assert "skipped 2 unreadable images" in caplog.text
    manifest = load_manifest(out)
    assert manifest.class_counts == [4, 4] and manifest.shard_sizes == [3, 2, 3]  # the 4th shard held only cut.jpg
    samples = written_samples(out)
    assert [label for _, label in samples] == [0] * 4 + [1] * 4
    index = np.load(out / "index.npz")
    assert index["label"].tolist() == [0] * 4 + [1] * 4 and index["shard"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    for n, shard in enumerate(manifest.shards):  # the index points at each image's bytes
        with tarfile.open(out / shard.name) as tar:
            images = [tar.extractfile(m).read() for m in tar if not m.name.endswith(".cls")]
        places = zip(index["offset"][index["shard"] == n], index["size"][index["shard"] == n])
        raw = (out / shard.name).read_bytes()
        assert [raw[o:o + s] for o, s in places] == images


@pytest.mark.parametrize("workers", ["1", "2"])
def test_strict_stops_at_the_bad_image_and_leaves_no_temporary_file(tmp_path, capsys, workers):
    make_images(tmp_path / "src", bad=True)
    out = tmp_path / "out"
    code = data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--strict", "--shard-samples", "3",
                     "--workers", workers])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and "Traceback" not in err and last.startswith("error: image ") and "garbage.png" in last
    assert tmp_files(out) == [] and os.listdir(out) == []  # not even the good shard written before it


def test_parallel_writers_write_the_same_bytes_around_a_bad_image(tmp_path):
    make_images(tmp_path / "src", bad=True)
    for workers in ("1", "2"):
        assert data_cli(["write", "folder", str(tmp_path / "src"), str(tmp_path / workers), "--shard-samples", "3",
                         "--workers", workers]) == 0
    one, two = load_manifest(tmp_path / "1"), load_manifest(tmp_path / "2")
    assert one.num_samples == 8 and one.shards == two.shards
    assert (tmp_path / "1" / "manifest.json").read_bytes() == (tmp_path / "2" / "manifest.json").read_bytes()
    for name in os.listdir(tmp_path / "1"):
        if name.endswith(".tar"):
            assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()
    a, b = np.load(tmp_path / "1" / "index.npz"), np.load(tmp_path / "2" / "index.npz")
    assert all((a[k] == b[k]).all() for k in a.files)
