"""The shard writer never deletes what it did not write, and never writes an image it cannot decode."""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from recog.data.__main__ import main as data_cli
from recog.data.decode import decode_sample
from recog.data.manifest import load_manifest
from recog.data.plan import Piece
from recog.data.stream import read_pieces
from recog.files import LOCK_FILE


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
    """Every file's sha256, but recog's lock file (the flock a writer takes; it may stay, empty)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


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
    (out / ".shard-000009.tar.tmp").write_bytes(b"named like recog's, but by no marker of a write: not ours")
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == [".recog.lock", ".shard-000009.tar.tmp", "index.npz", "manifest.json",
                                       "notes.txt", "shard-000000.tar"]
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
    assert tmp_files(out) == [] and os.listdir(out) == [".recog.lock"]  # not even the good shard written before it


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


FOREIGN_MANIFESTS = {
    "another tool's": '{"mine": "precious"}',
    "recog's embeddings": json.dumps({"format": "recog-embeddings/1", "count": 3, "shards": [{"name": "x"}]}),
    "not JSON": "precious notes",
}


@pytest.mark.parametrize("manifest", list(FOREIGN_MANIFESTS))
def test_overwrite_never_replaces_a_manifest_recog_did_not_write(tmp_path, capsys, manifest):
    make_images(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(FOREIGN_MANIFESTS[manifest])
    (out / "index.npz").write_bytes(b"theirs too")
    before = digests(out)
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--overwrite"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "manifest.json is not a manifest of recog's shard writer" in last and "not recog's to replace" in last
    assert digests(out) == before and not list(out.glob("shard-*"))


def many_images(src: Path, count: int) -> None:
    """`count` tiny PNGs in two classes: with --shard-samples 1, a write of many shards that takes a while."""
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
    for i in range(count):
        Image.new("L", (4, 4), i % 256).save(src / "ab"[i % 2] / f"{i:05d}.png")


@contextmanager
def writer_running(src: Path, out: Path):
    """A real `python -m recog.data write` of one shard per image, in its own process (its stderr in a file
    beside `src`: a pipe's buffer could fill with the progress bar and stop it), killed at the end if need be."""
    with open(src.parent / "writer.err", "wb") as err:
        writer = subprocess.Popen([sys.executable, "-m", "recog.data", "write", "folder", str(src), str(out),
                                   "--shard-samples", "1", "--no-shuffle"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        yield writer
    finally:
        writer.kill()
        writer.wait()


def said(src: Path) -> str:
    """The end of what the writer started on `src` wrote to its stderr."""
    return (src.parent / "writer.err").read_text()[-2000:]


def wait_for(path: Path, writer: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert writer.poll() is None, f"the writer ended first: {said(path.parent.parent / 'src')}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.005)


@pytest.mark.parametrize("again", [[], ["--overwrite"]])
def test_what_a_killed_writer_left_is_removed_by_the_next_write_and_nothing_else(tmp_path, again):
    many_images(tmp_path / "src", 600)
    out = tmp_path / "out"
    with writer_running(tmp_path / "src", out) as writer:
        wait_for(out / "shard-000002.tar", writer)
        writer.send_signal(signal.SIGKILL)  # mid-write: some shards, maybe a temporary one, no manifest
    left = os.listdir(out)
    assert ".recog-shard-write.json" in left and "manifest.json" not in left and "shard-000002.tar" in left
    mine = {}
    if again:  # a plain write needs the folder empty but for the dead write's files: no file of the user's there
        mine = {"notes.txt": "mine, written after the kill", ".shard-000599.tar.tmp.bak": "mine, named like recog's"}
        for name, text in mine.items():
            (out / name).write_text(text)
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--shard-samples", "1000", *again]) == 0
    assert sorted(os.listdir(out)) == sorted([".recog.lock", "index.npz", "manifest.json", "shard-000000.tar", *mine])
    assert all((out / name).read_text() == text for name, text in mine.items())
    assert load_manifest(out).num_samples == 600


def test_a_second_writer_into_the_same_folder_gets_one_sentence(tmp_path, capsys):
    many_images(tmp_path / "src", 300)
    out = tmp_path / "out"
    with writer_running(tmp_path / "src", out) as writer:
        wait_for(out / ".recog-shard-write.json", writer)  # written once the folder is held
        assert data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--overwrite"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: {out} is being written by shard write (pid {writer.pid})") and "wait" in last
        assert writer.wait(timeout=300) == 0, said(tmp_path / "src")  # undisturbed
    assert load_manifest(out).num_samples == 300 and ".recog-shard-write.json" not in os.listdir(out)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs root and a kernel that lets this process mount): a disk that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:  # lazily: a file a failed write left open (in a traceback) must not leave the mount behind
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_is_one_sentence_and_leaves_no_half_file(tmp_path, small_disk, capsys, workers):
    rng = np.random.default_rng(0)
    (tmp_path / "src" / "noise").mkdir(parents=True)
    for i in range(30):  # ~120 KB each, 3.6 MB in all: more than the disk holds
        noise = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "src" / "noise" / f"{i}.png")
    out = small_disk / "out"
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(out), "--shard-samples", "4",
                     "--workers", workers]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last == f"error: cannot write to {out} (No space left on device); free some " \
                                             "space or choose another folder."
    assert os.listdir(out) == [".recog.lock"]  # no shard, no temporary file, no marker


def test_a_class_index_far_above_the_images_is_one_sentence_in_little_time_and_memory(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "l.tsv").write_text("a.png\t0\na.png\t99999999999\n")
    measure = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "print(done.stderr.strip().splitlines()[-1])")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "recog.data", "write", "list",
                             str(tmp_path / "l.tsv"), str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    seconds = time.monotonic() - start
    (code, kilobytes), last = result.stdout.splitlines()[0].split(), result.stdout.splitlines()[1]
    assert code == "2" and seconds < 10 and int(kilobytes) < 1_000_000, (seconds, kilobytes)
    assert last.startswith(f"error: {tmp_path / 'l.tsv'}:2: class index 99999999999 is far above the 2 images")
    assert "number the classes from 0, or give class names" in last and not (tmp_path / "out").exists()


def test_labels_are_indices_only_in_ascii_digits(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "l.tsv").write_text("a.png\t²\na.png\t2\n")  # '²'.isdigit() is True, int('²') raises
    assert data_cli(["write", "list", str(tmp_path / "l.tsv"), str(tmp_path / "out")]) == 0
    assert load_manifest(tmp_path / "out").classes == ["2", "²"]  # names, then


@pytest.mark.parametrize("option", [["--quality", "1000"], ["--quality", "0"], ["--workers", "-1"], ["--workers", "0"]])
def test_options_out_of_range_are_one_sentence(tmp_path, capsys, option):
    make_images(tmp_path / "src")
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(tmp_path / "out"), *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and option[0] in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".gz", ".xz"])
def test_an_idx_file_that_is_not_what_its_name_says_is_one_sentence(tmp_path, capsys, suffix):
    for name in ("images", "labels"):
        (tmp_path / f"{name}{suffix}").write_bytes(np.random.default_rng(0).bytes(3000))
    assert data_cli(["write", "idx", str(tmp_path / f"images{suffix}"), str(tmp_path / f"labels{suffix}"),
                     str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / ('images' + suffix)} is not a readable {suffix} file (")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def idx_bytes(values: np.ndarray, code: int) -> bytes:
    """An MNIST-format idx file: magic (0, 0, element type, dimensions), each dimension, the values big-endian."""
    header = bytes([0, 0, code, values.ndim]) + np.array(values.shape, dtype=">u4").tobytes()
    return header + values.astype({0x08: "u1", 0x0C: ">i4"}[code]).tobytes()


@pytest.mark.parametrize("label", [2_000_000_000, -1])
def test_an_idx_label_file_with_indices_no_class_list_could_hold_is_one_sentence(tmp_path, capsys, label):
    (tmp_path / "images").write_bytes(idx_bytes(np.zeros((2, 4, 4)), 0x08))
    (tmp_path / "labels").write_bytes(idx_bytes(np.array([0, label]), 0x0C))
    assert data_cli(["write", "idx", str(tmp_path / "images"), str(tmp_path / "labels"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'labels'} holds labels from ") and "give class indices 0, 1" in err
    assert not (tmp_path / "out").exists()
