"""python -m recog.identify on real Fashion-MNIST test images, with a checkpoint trained for one short epoch by
train.py, exported, its gallery (the tiny training shards) embedded and indexed; and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BUNDLED, run_train, tiny_args
from identify_setup import fashion_test_images, random_checkpoint, run_module

from recog.data.idx import find_idx_pair
from recog.data.write import FASHION_MNIST_CLASSES, idx_records
from recog.embeddings import embed_shards
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
        embed_shards(root / "export", tiny_data["train"], root / "embeddings", part_size=400)
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
