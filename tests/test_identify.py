"""python -m recog.identify on real Fashion-MNIST test images, with a checkpoint trained for one short epoch by
train.py, exported, its gallery (the tiny training shards) embedded and indexed; and its refusals: of an export
crafted to run code, and of hostile image paths (a device, a FIFO, a folder, a decompression bomb), each one
sentence, in bounded time and memory."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import BUNDLED, run_train, tiny_args
from identify_setup import (
    embed_gallery,
    fashion_test_images,
    identify_bounded,
    pickled_weight,
    png_bomb,
    random_checkpoint,
    rewrite_archive,
    run_module,
)

from recog.data.idx import find_idx_pair
from recog.data.write import FASHION_MNIST_CLASSES, idx_records
from recog.export import export
from recog.identify import main, vote
from recog.index import build


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, tiny_data):
    """One epoch on the 1,000 tiny training images (one process), exported; those images embedded and indexed."""
    root = tmp_path_factory.mktemp("identify")
    result = run_train(tiny_args(tiny_data) + [f"hydra.run.dir={root / 'run'}"], cwd=root, nproc=None)
    assert result.returncode == 0, result.stdout + result.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export(root / "run" / "checkpoints" / "last.pt", root / "export", onnx=False)
        embed_gallery(root / "export", tiny_data["train"], root / "embeddings", "part_size=400")
    finally:
        torch.set_num_threads(threads)
    build(root / "embeddings", root / "index", log=lambda line: None)
    return root


@pytest.mark.slow  # trains for a few seconds (the gallery fixture)
def test_json_names_matches_and_a_vote_for_each_image(gallery, tmp_path):
    images = fashion_test_images(tmp_path / "test", 12)
    result = run_module("identify", "--model", gallery / "export", "--index", gallery / "index", "-k", "5", "--json",
                        *[path for path, _ in images])
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["image"] for a in answers] == [str(path) for path, _ in images]
    for answer in answers:
        assert answer["vote"] in FASHION_MNIST_CLASSES and len(answer["matches"]) == 5
        scores = [m["score"] for m in answer["matches"]]
        assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)
        for m in answer["matches"]:
            assert m["class"] == FASHION_MNIST_CLASSES[m["label"]] and len(m["key"].split(":")[1]) == 9
    right = sum(a["vote"] == FASHION_MNIST_CLASSES[label] for a, (_, label) in zip(answers, images))
    print(f"identify after one tiny epoch: {right} of {len(images)} test images voted right")
    assert right >= 6  # chance is 1 in 10


@pytest.mark.slow  # trains for a few seconds (the gallery fixture)
def test_a_gallery_image_finds_itself(gallery, tmp_path, capsys):
    """A training image as a PNG file, decoded and preprocessed by identify: its nearest gallery item is its own
    shard sample (written with key = its index), at cosine 1: the query and gallery pipelines agree."""
    records, _ = idx_records(*find_idx_pair(BUNDLED, "train"), FASHION_MNIST_CLASSES)
    (tmp_path / "train-7.png").write_bytes(records[7].read())
    assert main(["--model", str(gallery / "export"), "--index", str(gallery / "index"), "-k", "1", "--json",
                 str(tmp_path / "train-7.png")]) == 0
    (match,) = json.loads(capsys.readouterr().out)[0]["matches"]
    assert match["key"].endswith(":000000007") and match["label"] == records[7].label
    assert match["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow  # trains for a few seconds (the gallery fixture)
def test_an_unreadable_image_is_one_sentence_and_exit_code_2(gallery, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    result = run_module("identify", "--model", gallery / "export", "--index", gallery / "index",
                        tmp_path / "notes.png")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {tmp_path / 'notes.png'} is not an image that can be decoded "
                             "(UnidentifiedImageError); give a PNG, JPEG or WebP file.\n")


@pytest.mark.slow  # trains for a few seconds (the gallery fixture)
def test_another_models_export_or_a_missing_index_is_refused(gallery, tmp_path, capsys):
    image = str(fashion_test_images(tmp_path / "test", 1)[0][0])
    random_checkpoint(tmp_path / "other.pt", "model.embedding_dim=128")
    export(tmp_path / "other.pt", tmp_path / "other", onnx=False)
    assert main(["--model", str(tmp_path / "other"), "--index", str(gallery / "index"), image]) == 2
    assert "was built from another model's embeddings" in capsys.readouterr().err

    random_checkpoint(tmp_path / "narrow.pt", "model.embedding_dim=32")
    export(tmp_path / "narrow.pt", tmp_path / "narrow", onnx=False)
    assert main(["--model", str(tmp_path / "narrow"), "--index", str(gallery / "index"), image]) == 2
    assert "gives 32-d embeddings and the index" in capsys.readouterr().err

    assert main(["--model", str(gallery / "export"), "--index", str(tmp_path / "nowhere"), image]) == 2
    assert capsys.readouterr().err == (f"error: no index.json in {tmp_path / 'nowhere'}; give a folder written by "
                                       "python -m recog.index build.\n")
    assert main(["--model", str(gallery / "export"), "--index", str(gallery / "index"),
                 str(tmp_path / "none.png")]) == 2
    assert f"image {tmp_path / 'none.png'} cannot be read (No such file or directory)" in capsys.readouterr().err


def test_vote_weighs_labels_by_score():
    assert vote([3, 5, 5], [0.9, 0.4, 0.4]) == 3  # one close match outweighs two distant ones
    assert vote([3, 5, 5], [0.5, 0.4, 0.4]) == 5
    assert vote([2, 4], [0.5, 0.5]) == 2  # a tie: the best match's label
    assert vote([], []) is None


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory):
    """An export of random weights (no training): what the refusals below need."""
    root = tmp_path_factory.mktemp("plain-export")
    random_checkpoint(root / "last.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export(root / "last.pt", root / "export", onnx=False)
    finally:
        torch.set_num_threads(threads)
    return root / "export"


@pytest.mark.slow  # runs identify as a process
def test_an_export_crafted_to_run_code_is_refused_before_anything_runs(plain_export, tmp_path):
    """Issue 27's payload: one weight marked use_pickle in embedder.pt2, its file a pickle whose __reduce__ writes a
    file. torch.export.load unpickles it with weights_only=False; identify must refuse the archive first."""
    crafted, marker = tmp_path / "crafted", tmp_path / "ran-code"
    shutil.copytree(plain_export, crafted)
    rewrite_archive(crafted / "embedder.pt2", lambda records: pickled_weight(records, marker))
    image = fashion_test_images(tmp_path / "test", 1)[0][0]
    result = run_module("identify", "--model", crafted, "--index", tmp_path / "no-index", image)
    assert not marker.exists()
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {crafted / 'embedder.pt2'} holds 'backbone.0.0.weight' as a pickled object, "
                             "which recog does not load (loading it could run code); export the checkpoint again "
                             "with python -m recog.export.\n")


def hostile(kind: str, folder):
    """An image path a user (or a script) might pass: (path, extra arguments, what the sentence says)."""
    if kind == "device":
        return "/dev/zero", [], "is not a regular file (a device, FIFO or socket)"
    if kind == "fifo":
        os.mkfifo(folder / "pipe.png")
        return folder / "pipe.png", [], "is not a regular file (a device, FIFO or socket)"
    if kind == "folder":
        return folder, [], "is a folder"
    if kind == "too large":
        (folder / "big.png").write_bytes(bytes(3 << 20))
        return folder / "big.png", ["--max-mb", "2"], "is 3.0 MB, more than the 2.0 MB read"
    if kind == "bomb":  # grey, as the model takes: decoded by TorchCodec, which knows no pixel limit
        return png_bomb(folder / "bomb.png"), [], "has more pixels than the 89,478,485 decoded"
    if kind == "bomb under --max-pixels":
        return png_bomb(folder / "bomb.png", side=2000), ["--max-pixels", "1000000"], \
            "is 2000×2000 pixels, more than the 1,000,000 decoded"
    if kind == "thin":
        from PIL import Image

        Image.new("L", (4000, 10)).save(folder / "thin.png")
        return folder / "thin.png", [], "too thin to resize"
    raise ValueError(kind)


HOSTILE = ["device", "fifo", "folder", "too large", "bomb", "bomb under --max-pixels", "thin"]


@pytest.fixture(scope="module")
def hostile_answers(plain_export, tmp_path_factory):
    """identify on each hostile path, all in one process (its imports take seconds): {kind: (code, stderr,
    seconds, peak bytes)}, with the path and the words expected."""
    folder = tmp_path_factory.mktemp("hostile")
    cases, expected = {}, {}
    for kind in HOSTILE:
        (folder / kind).mkdir()
        path, extra, words = hostile(kind, folder / kind)
        cases[kind] = ["--model", plain_export, "--index", folder / "no-index", *extra, path]
        expected[kind] = (path, words)
    return identify_bounded(cases, seconds=10), expected


@pytest.mark.slow  # runs identify as a process
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_image_path_is_one_sentence_in_bounded_time_and_memory(hostile_answers, kind):
    """/dev/zero was read until the kernel killed identify (exit 137); a FIFO blocked it forever; a PNG bomb's
    pixels were all decoded. Now each is one sentence within 10 s, the process under 1 GB (imports included)."""
    answers, expected = hostile_answers
    code, stderr, seconds, peak = answers[kind]
    path, words = expected[kind]
    assert code == 2, (code, stderr)  # the child's -14: SIGALRM, it was still waiting
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: image {path} " if kind in HOSTILE[:4] else
                                                           f"error: {path} ")
    assert words in stderr, stderr
    assert seconds < 10 and peak < 1 << 30, f"{seconds:.1f} s, {peak / 2**20:.0f} MB"
