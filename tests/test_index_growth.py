"""An index that grows with the catalogue (issue 29): `recog.index add` of a new day's embeddings, with new
classes, gives what a fresh build of both days gives (flat: the same ids, classes and scores; IVF-SQ8: the same
recall); shards roll over at the index's shard size; a SIGKILL during `add` leaves the previous generation whole;
a key the index holds is refused or skipped; a reader holding a generation opens it after the next commit.

The embeddings are real: day 1's model (train.py for an epoch on day 1, exported) run by `python -m recog.embed`
over shard folders of the bundled Fashion-MNIST written as two days: day 1 holds 7 classes, day 2 three new ones
and the rest of two old ones, with its own class list (its labels index that list, not day 1's)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import BUNDLED, ROOT, run_train, tiny_args
from identify_setup import clustered, embed_gallery, run_module, write_embeddings

from recog.data.idx import find_idx_pair
from recog.data.write import FASHION_MNIST_CLASSES, idx_records, write_shards
from recog.embeddings import open_embeddings, part_name, write_manifest, write_part
from recog.errors import ConfigError
from recog.export import export
from recog.files import LOCK_FILE
from recog.gallery import open_gallery, open_generation
from recog.index import add, build
from recog.index_files import FileGone, read_generation, read_index_info

DAY1 = FASHION_MNIST_CLASSES[:7]
NEW = FASHION_MNIST_CLASSES[7:]  # Sneaker, Bag, Ankle boot: first seen on day 2
DAY2 = [NEW[0], DAY1[5], NEW[1], DAY1[2], NEW[2]]  # day 2's own order: its labels index this list
K = 10


def quiet(line):
    pass


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # conftest.py


def day_shards(out: Path, records: list, classes: list[str]) -> Path:
    """Shards of `records` (labelled by the bundled class list) with the class list `classes`."""
    mine = [dataclasses.replace(r, label=classes.index(FASHION_MNIST_CLASSES[r.label])) for r in records]
    write_shards(mine, classes, out, prefix="day", shard_samples=700, progress=False)
    return out


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> dict[str, Path]:
    """Embeddings of day 1 (60 % of the first 3,000 training images' of 7 classes: 1,263), day 2 (of the other
    40 %, those of 2 of the classes, and every image of the 3 new classes: 1,122), both days as one folder (the
    union of the class lists, as a build from both would see them) and 400 test images as queries."""
    root = tmp_path_factory.mktemp("growth")
    records, _ = idx_records(*find_idx_pair(BUNDLED, "train"), FASHION_MNIST_CLASSES)
    records = records[:3000]
    old = [r for r in records if FASHION_MNIST_CLASSES[r.label] in DAY1]
    cut = int(0.6 * len(old))
    day2 = [r for r in old[cut:] if FASHION_MNIST_CLASSES[r.label] in DAY2]
    day2 += [r for r in records if FASHION_MNIST_CLASSES[r.label] in NEW]
    tests, _ = idx_records(*find_idx_pair(BUNDLED, "test"), FASHION_MNIST_CLASSES)
    day_shards(root / "day1", old[:cut], DAY1)
    day_shards(root / "day2", day2, DAY2)
    day_shards(root / "test", tests[:400], FASHION_MNIST_CLASSES)
    day_shards(root / "day1-test", [r for r in tests[:400] if FASHION_MNIST_CLASSES[r.label] in DAY1], DAY1)
    result = run_train(tiny_args({"train": root / "day1", "test": root / "day1-test"})
                       + [f"hydra.run.dir={root / 'run'}"], cwd=root, nproc=None)
    assert result.returncode == 0, result.stdout + result.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export(root / "run" / "checkpoints" / "last.pt", root / "export", onnx=False)
    finally:
        torch.set_num_threads(threads)
    for name in ("day1", "day2", "test"):
        embed_gallery(root / "export", root / name, root / f"emb-{name}", "part_size=500")
    join(root / "emb-day1", root / "emb-day2", root / "emb-both")
    return root


def read_all(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    emb = open_embeddings(folder)
    keys, labels = zip(*(emb.keys_labels(part) for part in emb.parts))
    return (np.concatenate([c.vectors for c in emb.chunks()]), np.concatenate(keys), np.concatenate(labels),
            emb.classes)


def join(first: Path, second: Path, out: Path) -> Path:
    """One embeddings folder of both, labels by name into the union of their class lists (first's, then second's
    new names): what an embedder of the two folders as one data set writes."""
    (v1, k1, l1, c1), (v2, k2, l2, c2) = read_all(first), read_all(second)
    classes = c1 + [c for c in c2 if c not in c1]
    relabel = np.array([classes.index(c) for c in c2])
    part = write_part(out, part_name(0), np.concatenate([v1, v2]), np.concatenate([k1, k2]),
                      np.concatenate([l1, relabel[l2]]))
    sha = open_embeddings(first).model_sha256
    write_manifest(out, sha, v1.shape[1], "float32", [part], classes)
    return out


def subset(source: Path, out: Path, rows: np.ndarray, extra: tuple | None = None) -> Path:
    """An embeddings folder of some of `source`'s items (its class list), and of `extra` (vectors, keys,
    labels)."""
    vectors, keys, labels, classes = read_all(source)
    vectors, keys, labels = vectors[rows], keys[rows], labels[rows]
    if extra:
        vectors, keys, labels = (np.concatenate([a, b]) for a, b in zip((vectors, keys, labels), extra))
    part = write_part(out, part_name(0), vectors, keys, labels)
    write_manifest(out, open_embeddings(source).model_sha256, vectors.shape[1], "float32", [part], classes)
    return out


def answers(folder: Path, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each query's top K: scores, ids, keys and class names."""
    gallery = open_gallery(folder)
    scores, ids = gallery.search(queries, K)
    classes = np.array(gallery.info.classes)
    return scores, ids, gallery.keys[ids], classes[gallery.labels[ids]]


def assert_same(got, want) -> None:
    assert (got[1] == want[1]).all() and (got[2] == want[2]).all() and (got[3] == want[3]).all()
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)


def queries_of(days: Path) -> np.ndarray:
    return read_all(days / "emb-test")[0]


@pytest.mark.slow  # exports a model and embeds three shard folders (the days fixture)
@pytest.mark.parametrize("shard_size", [None, 500])
def test_adding_day_2_with_new_classes_equals_a_fresh_build_of_both(days, tmp_path, shard_size):
    """Flat: the same ids, keys, classes by name and scores as a build of both days at once; with a shard size of
    500 the grown index rolls over into shards of 500 and still answers as the fresh one-shard build."""
    build(days / "emb-day1", tmp_path / "grown", "flat", shard_size=shard_size, log=quiet)
    info = add(tmp_path / "grown", days / "emb-day2", log=quiet)
    fresh = build(days / "emb-both", tmp_path / "fresh", "flat", log=quiet)
    assert info.classes == fresh.classes == DAY1 + NEW  # old labels unchanged, new names appended
    assert info.count == fresh.count == 2385 and info.generation == 1
    counts = [2385] if shard_size is None else [500, 500, 500, 500, 385]
    assert info.shard_counts == counts
    assert [faiss.read_index(str(tmp_path / "grown" / name)).ntotal for name in info.raw["shards"]] == counts
    gallery = open_gallery(tmp_path / "grown")
    assert (gallery.keys == open_gallery(tmp_path / "fresh").keys).all()
    assert (gallery.labels == open_gallery(tmp_path / "fresh").labels).all()
    queries = queries_of(days)
    assert_same(answers(tmp_path / "grown", queries), answers(tmp_path / "fresh", queries))
    assert {str(c) for c in answers(tmp_path / "grown", queries)[3].ravel()} >= set(NEW)  # new items are found


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """k-recall@k: the share of the true top K found."""
    return float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact)]))


@pytest.mark.slow  # the days fixture
def test_an_ivfsq_index_grown_by_day_2_keeps_a_fresh_builds_recall(days, tmp_path):
    """IVF-SQ8 trained on day 1 only (its lists and codes kept for day 2's vectors and new classes), in shards
    of 600 that roll over: recall@10 against the exact answers within 0.01 of an IVF-SQ8 built on both days. Its
    32 lists (a fresh build: 61) probe as many lists as the fresh build (3, not 1/16 of 32), and its codes' range
    has the margin new classes need (SQ_MARGIN)."""
    build(days / "emb-day1", tmp_path / "grown", "ivfsq", shard_size=600, log=quiet)
    lines = []
    info = add(tmp_path / "grown", days / "emb-day2", log=lines.append)
    assert info.shard_counts == [600, 600, 600, 585]
    assert lines == ["2,385 vectors in the 32 lists trained at build time: nprobe 2 -> 3, as a fresh build probes"]
    build(days / "emb-both", tmp_path / "fresh", "ivfsq", log=quiet)
    build(days / "emb-both", tmp_path / "exact", "flat", log=quiet)
    queries = queries_of(days)
    exact = answers(tmp_path / "exact", queries)[1]
    grown, fresh = recall(answers(tmp_path / "grown", queries)[1], exact), recall(
        answers(tmp_path / "fresh", queries)[1], exact)
    print(f"IVF-SQ8 10-recall@10 on {len(queries)} test images: grown by add {grown:.4f}, fresh build {fresh:.4f}")
    assert grown >= fresh - 0.01  # not worse (measured: 0.945 grown, 0.936 fresh: it scans more vectors per query)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".recog.lock"}


@pytest.mark.slow  # the days fixture; runs the CLI as a process
def test_a_key_the_index_holds_is_refused_or_skipped_with_a_count(days, tmp_path):
    """Refused (the default): one sentence, nothing written. --duplicates skip: the count printed, the index's
    items kept, the rest added: the same index as adding only the new items."""
    build(days / "emb-day1", tmp_path / "index", "flat", log=quiet)
    v1, k1, l1, _ = read_all(days / "emb-day1")
    # 200 of day 2's items, 30 items of day 1 (day 2's class list: none of them is a day-2 class there, so label
    # -1) and one of day 2's items again
    rows = np.r_[np.arange(200), 5]
    mixed = subset(days / "emb-day2", tmp_path / "mixed", rows, (v1[:30], k1[:30], np.full(30, -1)))
    before = snapshot(tmp_path / "index")
    result = run_module("index", "add", tmp_path / "index", mixed)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: the index in {tmp_path / 'index'} already holds 30 key(s) of the embeddings "
                             f"in {mixed} (first {str(k1[0])!r}); add only embeddings of new items (new shard "
                             "folders), or pass --duplicates skip to add the others.\n")
    assert snapshot(tmp_path / "index") == before
    twice = subset(days / "emb-day2", tmp_path / "twice", np.r_[np.arange(10), 3])
    with pytest.raises(ConfigError, match=r"hold 1 key\(s\) twice \(first '.*'\)"):
        add(tmp_path / "index", twice)
    assert snapshot(tmp_path / "index") == before

    result = run_module("index", "add", tmp_path / "index", mixed, "--duplicates", "skip")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "skipped 31 item(s) the index holds already or the embeddings hold " \
                                            "twice; adding 200"
    info = read_index_info(tmp_path / "index")
    assert info.count == 1263 + 200 and info.generation == 1
    subset(days / "emb-day2", tmp_path / "new", np.arange(200))
    build(days / "emb-day1", tmp_path / "expected", "flat", log=quiet)
    add(tmp_path / "expected", tmp_path / "new", log=quiet)
    queries = queries_of(days)
    assert_same(answers(tmp_path / "index", queries), answers(tmp_path / "expected", queries))
    again = run_module("index", "add", tmp_path / "index", mixed, "--duplicates", "skip")  # nothing new
    assert again.returncode == 0 and "adding 0" in again.stdout
    assert read_index_info(tmp_path / "index").generation == 1


def new_files(folder: Path, generation: int) -> list[str]:
    return [p.name for p in folder.iterdir() if f".g{generation}." in p.name]


def add_killed(index: Path, embeddings: Path, when) -> tuple[bool, list[str]]:
    """`python -m recog.index add` killed (SIGKILL) as soon as `when(names in the folder)` holds: whether it was
    killed before it ended, and the names seen then."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "recog.index", "add", str(index), str(embeddings)], env=env,
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            names = [p.name for p in index.iterdir()]
            if when(names):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True, names
            time.sleep(0.001)
        assert process.wait(timeout=5) == 0, process.stderr.read()
        return False, [p.name for p in index.iterdir()]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


@pytest.mark.slow  # the days fixture; ten processes
def test_a_sigkill_during_add_leaves_the_previous_generation_whole(days, tmp_path):
    """`add` killed at each stage of its writing (its first temporary file, a shard written, the ids' temporary
    file, the ids written, index.json's temporary file): index.json and the previous generation's files answer as
    before, or (a kill after the switch) the new generation answers whole; the next add works, equals a fresh
    build of both and leaves no file of the killed one behind."""
    build(days / "emb-day1", tmp_path / "pristine", "flat", shard_size=100, log=quiet)  # 12 new shard files
    queries = queries_of(days)
    old = answers(tmp_path / "pristine", queries)
    build(days / "emb-both", tmp_path / "fresh", "flat", log=quiet)
    new = answers(tmp_path / "fresh", queries)
    stages = {
        "a temporary file": lambda names: any(n.startswith(".") and ".g1." in n for n in names),
        "a shard written": lambda names: "shard-00015.g1.faiss" in names,
        "the ids' temporary file": lambda names: any(n.startswith(".ids.g1.npz.tmp") for n in names),
        "the ids written": lambda names: "ids.g1.npz" in names,
        "index.json's temporary file": lambda names: any(n.startswith(".index.json.tmp") for n in names),
    }
    killed_mid_write = []
    for number, (stage, when) in enumerate(stages.items()):
        index = tmp_path / f"index-{number}"
        shutil.copytree(tmp_path / "pristine", index)
        killed, seen = add_killed(index, days / "emb-day2", when)
        info = read_index_info(index)
        if info.generation == 0:
            assert_same(answers(index, queries), old)
            killed_mid_write.append(stage)
            assert killed and new_files(index, 1)  # it died with generation 1 half-written
        else:  # killed after the switch (or it ended first): the new generation, whole
            assert info.generation == 1
            assert_same(answers(index, queries), new)
    assert {"a temporary file", "a shard written"} <= set(killed_mid_write)
    for number, stage in enumerate(stages):
        if stage in killed_mid_write:  # the next add works, and removes what the killed one left
            index = tmp_path / f"index-{number}"
            info = add(index, days / "emb-day2", log=quiet)
            assert info.generation == 1 and info.shard_counts == [100] * 23 + [85]
            assert_same(answers(index, queries), new)
            assert sorted(os.listdir(index)) == sorted([*info.files(), *info.retired(), "index.json", LOCK_FILE])
            assert info.raw["shards"][:12] == [f"shard-{n:05d}.g0.faiss" for n in range(12)]  # full: not rewritten


@pytest.mark.slow  # the days fixture
def test_a_reader_holding_a_generation_opens_it_after_the_next_commit(days, tmp_path):
    """A reader (recog.serve reloading, a shard server) that read index.json just before an add switched it still
    opens every file of its generation; one that read it two commits ago reads index.json again."""
    build(days / "emb-day1", tmp_path / "index", "flat", log=quiet)
    queries = queries_of(days)
    first = answers(tmp_path / "index", queries)
    held = read_index_info(tmp_path / "index")
    subset(days / "emb-day2", tmp_path / "part1", np.arange(600))
    subset(days / "emb-day2", tmp_path / "part2", np.arange(600, 1122))
    add(tmp_path / "index", tmp_path / "part1", log=quiet)
    gallery = open_generation(held, None, None)  # generation 0's files: still there
    assert gallery.info.generation == 0 and (gallery.search(queries, K)[1] == first[1]).all()

    one_behind = read_index_info(tmp_path / "index")
    generations = []

    def slow_reader(info):  # two commits land between its reading index.json and opening the files it names
        generations.append(info.generation)
        if len(generations) == 1:
            add(tmp_path / "index", tmp_path / "part2", log=quiet)
            build(days / "emb-both", tmp_path / "index", "flat", overwrite=True, log=quiet)
        return open_generation(info, None, None)

    gallery = read_generation(tmp_path / "index", slow_reader)
    assert one_behind.generation == 1 and generations == [1, 3] and gallery.info.generation == 3
    with pytest.raises(FileGone, match="shard-00000.g0.faiss is missing"):  # two commits on: generation 0 is gone
        open_generation(held, None, None)


def test_a_file_missing_from_the_current_generation_is_one_sentence(tmp_path):
    """Not a commit (index.json names the same generation): the reader does not loop, it says what is missing."""
    build(write_embeddings(tmp_path / "emb", clustered(300, dim=16), part_size=300), tmp_path / "index", log=quiet)
    (tmp_path / "index" / "shard-00000.g0.faiss").unlink()
    with pytest.raises(ConfigError, match="shard-00000.g0.faiss is missing; build the index in .* again"):
        open_gallery(tmp_path / "index")


def test_new_labels_are_mapped_by_name_and_new_classes_appended(tmp_path):
    """Embeddings whose class list orders the old names otherwise and adds two: their labels index their own
    list; in the index each item keeps its class by name, -1 (no label) stays -1."""
    build(write_embeddings(tmp_path / "a", clustered(100, dim=16), part_size=100, classes=3), tmp_path / "index",
          log=quiet)
    folder = tmp_path / "b"
    part = write_part(folder, part_name(0), clustered(5, dim=16, seed=1), [f"n{i}" for i in range(5)],
                      [0, 1, 2, 3, -1])
    write_manifest(folder, "a" * 64, 16, "float32", [part], ["new1", "class2", "new0", "class0"])
    info = add(tmp_path / "index", folder, log=quiet)
    assert info.classes == ["class0", "class1", "class2", "new1", "new0"]
    gallery = open_gallery(tmp_path / "index")
    assert list(gallery.labels[100:]) == [3, 2, 4, 0, -1]
    assert json.loads((tmp_path / "index" / "index.json").read_text())["classes"] == info.classes


def test_shard_size_and_shards_are_one_choice(tmp_path):
    emb = write_embeddings(tmp_path / "emb", clustered(300, dim=16), part_size=300)
    with pytest.raises(ConfigError, match="give one of them"):
        build(emb, tmp_path / "index", shards=2, shard_size=100, log=quiet)
    with pytest.raises(ConfigError, match="--shard-size 0 holds no vectors"):
        build(emb, tmp_path / "index", shard_size=0, log=quiet)
    info = build(emb, tmp_path / "index", shards=4, log=quiet)
    assert info.shard_size == 75 and info.shard_counts == [75] * 4


def test_build_never_removes_an_index_file_no_index_json_names(tmp_path):
    """An index set aside (its index.json moved away) or a build killed before its end: build refuses the folder in
    one sentence and leaves the file; a killed writer's temporary file is removed."""
    emb = write_embeddings(tmp_path / "emb", clustered(300, dim=16), part_size=300)
    build(emb, tmp_path / "index", log=quiet)
    (tmp_path / "index" / "index.json").rename(tmp_path / "index.json.bak")
    kept = (tmp_path / "index" / "shard-00000.g0.faiss").read_bytes()
    with pytest.raises(ConfigError, match=r"holds (shard-00000\.g0\.faiss|ids\.g0\.npz), an index file that no "
                                          r"index\.json there names"):
        build(emb, tmp_path / "index", log=quiet)
    assert (tmp_path / "index" / "shard-00000.g0.faiss").read_bytes() == kept
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / ".index.json.tmp-12345").write_text("{")
    build(emb, tmp_path / "fresh", log=quiet)
    assert not (tmp_path / "fresh" / ".index.json.tmp-12345").exists()
