"""Hostile input to the gallery side (issue 27): files named outside their folder, galleries grown from several
shard folders (one key per item), two writers of one index, pickles in an ids file, a full disk, and the words of
the refusals. Every file an index, an embeddings folder or a shard manifest names is a plain name in its folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from identify_setup import clustered, embed_gallery, random_checkpoint, run_module, write_embeddings

from recog.data.manifest import item_key, load_manifest
from recog.embeddings import open_embeddings
from recog.errors import ConfigError
from recog.export import export
from recog.files import LOCK_FILE
from recog.gallery import open_gallery
from recog.index import add, build, choose_kind

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quiet(line):
    pass


def snapshot(folder: Path, leave_out: Path | None = None) -> dict[str, bytes]:
    """Every file under `folder` (but those under `leave_out`), byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (leave_out is None or leave_out not in p.parents)}


def test_an_index_naming_a_file_outside_its_folder_deletes_and_reads_nothing_there(tmp_path):
    emb = write_embeddings(tmp_path / "emb", clustered(300, dim=16), part_size=100)
    build(emb, tmp_path / "index", log=quiet)
    (tmp_path / "victim.txt").write_text("precious")
    description = json.loads((tmp_path / "index" / "index.json").read_text())
    description["shards"].append("../victim.txt")
    (tmp_path / "index" / "index.json").write_text(json.dumps(description))
    outside = snapshot(tmp_path, leave_out=tmp_path / "index")

    result = run_module("index", "build", emb, tmp_path / "index", "--overwrite")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "'../victim.txt', which is not a plain file name" in result.stderr
    with pytest.raises(ConfigError, match="not a plain file name"):
        open_gallery(tmp_path / "index")
    with pytest.raises(ConfigError, match="not a plain file name"):
        add(tmp_path / "index", emb)
    assert snapshot(tmp_path, leave_out=tmp_path / "index") == outside  # nothing outside changed, byte for byte


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/shard.tar", ".."])
def test_a_shard_manifest_naming_a_path_is_refused_before_anything_is_read(tiny_data, tmp_path, name):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_data["train"], folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["shards"][0]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="not a plain file name inside its folder"):
        load_manifest(folder)
    raw["shards"][0]["name"], raw["index"] = "train-000000.tar", "../index.npz"
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="'../index.npz', which is not a plain file name"):
        load_manifest(folder)


def test_an_embeddings_manifest_naming_a_path_is_refused(tmp_path):
    emb = write_embeddings(tmp_path / "emb", clustered(50, dim=8), part_size=50)
    raw = json.loads((emb / "manifest.json").read_text())
    raw["parts"][0]["name"] = "../part-00000"
    (emb / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="not a plain file name"):
        open_embeddings(emb)


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory, tiny_data):
    """An export, and embeddings of two shard folders whose per-folder keys overlap (both count from 000000000)."""
    root = tmp_path_factory.mktemp("gallery")
    random_checkpoint(root / "model.pt")
    export(root / "model.pt", root / "export", onnx=False)
    for split in ("train", "test"):
        embed_gallery(root / "export", tiny_data[split], root / f"emb-{split}", "part_size=400")
    return root


def test_keys_are_unique_across_folders_and_name_their_folder(two_folders, tiny_data, tmp_path):
    train, test = load_manifest(tiny_data["train"]), load_manifest(tiny_data["test"])
    assert train.identity != test.identity and len(train.identity) == 16
    build(two_folders / "emb-train", tmp_path / "index", log=quiet)
    info = add(tmp_path / "index", two_folders / "emb-test")
    gallery = open_gallery(tmp_path / "index")
    keys = gallery.keys.tolist()
    assert info.count == len(keys) == len(set(keys)) == 1000 + 301  # the bare keys overlap: 301 of them
    assert keys[0] == item_key(train.identity, "000000000") and keys[1000] == item_key(test.identity, "000000000")
    assert [s["identity"] for s in info.sources] == [train.identity, test.identity]


def test_adding_the_same_items_twice_is_refused_and_changes_nothing(two_folders, tmp_path):
    build(two_folders / "emb-test", tmp_path / "index", log=quiet)
    before = snapshot(tmp_path / "index")
    with pytest.raises(ConfigError, match="already holds .*301 key"):
        add(tmp_path / "index", two_folders / "emb-test")
    assert snapshot(tmp_path / "index") == before and open_gallery(tmp_path / "index").info.count == 301


def test_a_service_refuses_shards_the_gallery_was_not_embedded_from(two_folders, tiny_data, tmp_path):
    from recog.serve import GalleryImages

    build(two_folders / "emb-test", tmp_path / "index", log=quiet)
    sources = open_gallery(tmp_path / "index").info.sources
    with pytest.raises(ConfigError, match="are not ones the gallery .* was embedded from"):
        GalleryImages([str(tiny_data["train"])], sources, index_dir=str(tmp_path / "index"))
    images = GalleryImages([str(tiny_data["test"])], sources, index_dir=str(tmp_path / "index"))
    key = open_gallery(tmp_path / "index").keys[7]
    assert images.read(str(key)) is not None and images.read(key.split(":")[1]) is None
    # the same items' shards copied elsewhere are the same folder: their identity is their content's
    shutil.copytree(tiny_data["test"], tmp_path / "copy")
    assert GalleryImages([str(tmp_path / "copy")], sources).read(str(key)) is not None


def lock_holder(folder: Path) -> str:
    try:
        return (folder / LOCK_FILE).read_text()
    except OSError:
        return ""


@pytest.mark.slow  # two CLI processes
def test_a_second_index_add_while_the_first_runs_gets_one_sentence(tmp_path):
    build(write_embeddings(tmp_path / "a", clustered(300, dim=16), part_size=300), tmp_path / "index", log=quiet)
    write_embeddings(tmp_path / "b", clustered(200, dim=16, seed=1), part_size=200, first_key=300)
    write_embeddings(tmp_path / "c", clustered(100, dim=16, seed=2), part_size=100, first_key=500)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "recog.index", "add", tmp_path / "index", tmp_path / "b"],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while f"pid {first.pid}" not in lock_holder(tmp_path / "index"):  # the first holds the folder ...
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # ... and stays in the middle of its write while the second starts
        second = run_module("index", "add", tmp_path / "index", tmp_path / "c")
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2 and second.stderr == (
            f"error: {tmp_path / 'index'} is being written by index add (pid {first.pid}); wait for it to finish, "
            "or choose another folder for this index add.\n")
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        first.kill()
    assert open_gallery(tmp_path / "index").info.count == 500
    assert add(tmp_path / "index", tmp_path / "c").count == 600  # the lock went with its holder


def test_an_ids_file_holding_pickled_objects_is_never_unpickled(tmp_path):
    build(write_embeddings(tmp_path / "emb", clustered(50, dim=8), part_size=50), tmp_path / "index", log=quiet)
    info = json.loads((tmp_path / "index" / "index.json").read_text())
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    keys = np.empty(50, dtype=object)
    keys[:] = [Payload()] * 50
    with open(tmp_path / "index" / info["ids"], "wb") as f:
        np.savez(f, keys=keys, labels=np.zeros(50, np.int64))
    assert b"write_text" in pickle.dumps(Payload())  # the payload is real: unpickled, it would write the marker
    with pytest.raises(ConfigError, match="cannot be read as the index's keys and labels"):
        open_gallery(tmp_path / "index")
    with pytest.raises(ConfigError, match="cannot be read as the index's keys and labels"):
        add(tmp_path / "index", write_embeddings(tmp_path / "more", clustered(10, dim=8), part_size=10, first_key=50))
    assert not marker.exists()


def test_wrong_words_are_right(tmp_path, tiny_data, two_folders):
    with pytest.raises(ConfigError, match="^IVF-SQ8 needs at least 256 vectors"):
        choose_kind("ivfsq", 100, 32)
    with pytest.raises(ConfigError, match="^IVF-PQ needs at least 256 vectors"):
        choose_kind("ivfpq", 100, 32)
    empty = write_embeddings(tmp_path / "empty", np.zeros((0, 8), np.float32), part_size=10)
    with pytest.raises(ConfigError, match="hold no vectors; embed a folder of shards"):
        build(empty, tmp_path / "index", log=quiet)
    # a folder of embeddings given as shards, and shards given as the embeddings' output
    with pytest.raises(ConfigError, match="is a folder of embeddings .*, not of shards"):
        load_manifest(two_folders / "emb-test")
    shards = tmp_path / "shards"
    shutil.copytree(tiny_data["test"], shards)
    before = snapshot(shards)
    refused = run_module("embed", f"model={two_folders / 'export'}", f"data={tiny_data['test']}", f"out={shards}")
    assert refused.returncode == 2 and "holds shards (python -m recog.data write), not embeddings" in refused.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"mine": "precious"}')
    refused = run_module("embed", f"model={two_folders / 'export'}", f"data={tiny_data['test']}",
                         f"out={tmp_path / 'other'}")
    assert refused.returncode == 2 and "holds another tool's manifest.json, not embeddings" in refused.stderr
    assert snapshot(shards) == before and (tmp_path / "other" / "manifest.json").read_text() == '{"mine": "precious"}'


def mounted_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_an_index_build_on_a_full_disk_is_one_sentence_and_leaves_no_half_file(tmp_path):
    emb = write_embeddings(tmp_path / "emb", clustered(4000, dim=256), part_size=4000)  # 4 MB of vectors
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = run_module("index", "build", emb, disk / "index", "--kind", "flat")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr == (f"error: cannot write to {disk / 'index'} (No space left on device); free some "
                                 "space or choose another folder.\n")
        assert sorted(p.name for p in (disk / "index").iterdir()) == [LOCK_FILE]  # no temp file, no index.json
    finally:
        subprocess.run(["umount", str(disk)], check=False)
