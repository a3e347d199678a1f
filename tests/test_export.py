"""python -m recog.export: the exported embedder computes what the trained model computes, from a classifier
and from a retrieval checkpoint; a file that is not a recog checkpoint, a folder, a full disk: one sentence and
exit code 2. An embedder.pt2 crafted to run code when torch.export.load reads it is refused before it is read."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from identify_setup import ATTACKS, WEIGHTS_CONFIG, random_checkpoint, rewrite_archive, run_module

from recog.data.normalize import Normalize
from recog.data.write import FASHION_MNIST_CLASSES
from recog.errors import ConfigError
from recog.export import export
from recog.exported import ExportedEmbedder, pt2_problem
from recog.files import sha256_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_data):
    """The default job's config (trained on the tiny shards), random weights, exported with ONNX."""
    folder = tmp_path_factory.mktemp("classifier")
    model = random_checkpoint(folder / "last.pt", f"data.train={tiny_data['train']}")
    info = export(folder / "last.pt", folder / "export")
    return model, info, folder


def eager_embeddings(model, info, images: torch.Tensor) -> np.ndarray:
    """What training and evaluation compute: Normalize, then the model's embeddings."""
    with torch.no_grad():
        return model(Normalize(info["mean"], info["std"])(images)).embeddings.numpy()


def random_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 37])
def test_pt2_and_onnx_equal_the_eager_model(classifier, batch):
    model, info, folder = classifier
    images = random_images(batch, batch)
    expected = eager_embeddings(model, info, images)
    program = torch.export.load(folder / "export" / "embedder.pt2").module()
    with torch.no_grad():
        exported = program(images).numpy()
    assert exported.shape == (batch, info["embedding_dim"])
    assert np.abs(exported - expected).max() <= 1e-5
    assert np.allclose(np.linalg.norm(exported, axis=1), 1, atol=1e-5)

    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "export" / "embedder.onnx"),
                                           providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(None, {"images": images.numpy()})
    assert np.abs(from_onnx - expected).max() <= 1e-4


def test_model_json_says_what_the_embedder_expects(classifier, tiny_data):
    model, info, folder = classifier
    written = json.loads((folder / "export" / "model.json").read_text())
    assert written == json.loads(json.dumps(info))
    assert written["checkpoint"]["sha256"] == sha256_of(folder / "last.pt")
    assert written["input"] == {"dtype": "uint8", "layout": "NCHW", "channels": 1, "image_size": 28,
                                "normalized_inside": True}
    assert written["preprocess"]["resize"] == "shorter_side" and written["preprocess"]["crop"] == "center"
    assert written["mean"] == [0.2853] and written["std"] == [0.3541]
    assert written["embedding_dim"] == model.embed.out_features
    assert written["classes"] == FASHION_MNIST_CLASSES  # from the training shards' manifest
    assert written["classes_from"] == f"manifest of {tiny_data['train']}"
    assert written["files"] == {"pt2": "embedder.pt2", "onnx": "embedder.onnx"}


def test_retrieval_checkpoint_exports(tmp_path):
    """experiment=retrieval_fashion (P×K, triplet loss); its shards are not there: names from the data preset."""
    model = random_checkpoint(tmp_path / "best.pt", "experiment=retrieval_fashion", "data.train=/nonexistent/train",
                              "model.embedding_dim=64")
    info = export(tmp_path / "best.pt", tmp_path / "export", onnx=False)
    assert info["classes"] == FASHION_MNIST_CLASSES and info["classes_from"] == "data.prepare.class_names"
    assert info["embedding_dim"] == 64 and info["files"] == {"pt2": "embedder.pt2"}
    assert not (tmp_path / "export" / "embedder.onnx").exists()
    images = random_images(5, 0)
    with torch.no_grad():
        exported = torch.export.load(tmp_path / "export" / "embedder.pt2").module()(images).numpy()
    assert np.abs(exported - eager_embeddings(model, info, images)).max() <= 1e-5


def test_an_earlier_export_is_replaced_only_when_asked(classifier, capsys):
    from recog.export import main

    _, _, folder = classifier
    (folder / "export" / "notes.txt").write_text("mine")
    assert main([str(folder / "last.pt"), str(folder / "export"), "--no-onnx"]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert main([str(folder / "last.pt"), str(folder / "export"), "--overwrite", "--no-onnx"]) == 0
    assert (folder / "export" / "notes.txt").read_text() == "mine"  # not the export's: left alone


def not_a_checkpoint(kind: str, folder, checkpoint):
    """A file a user might give by mistake: text, torchvision weights, a checkpoint cut short."""
    path = folder / {"text": "notes.txt", "torchvision": "squeezenet.pth", "truncated": "cut.pt"}[kind]
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "torchvision":
        torch.save(torchvision.models.get_model("squeezenet1_1", weights=None).state_dict(), path)
    elif kind == "truncated":
        data = checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.slow  # runs the CLI as a process
@pytest.mark.parametrize("kind, message", [
    ("text", "is not a PyTorch checkpoint"),
    ("torchvision", "is not a recog checkpoint"),
    ("truncated", "is damaged or cut short"),
])
def test_not_a_recog_checkpoint_is_one_sentence_and_exit_code_2(classifier, tmp_path, kind, message):
    path = not_a_checkpoint(kind, tmp_path, classifier[2] / "last.pt")
    result = run_module("export", path, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr and str(path) in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    from recog.export import main

    assert main([str(tmp_path / "none.pt"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path / 'none.pt'} does not exist; check the path " \
                                      "given to python -m recog.export\n"


def test_a_checkpoint_folder_is_named_as_a_folder(classifier, tmp_path, capsys):
    from recog.export import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert main([str(run), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: {run} is a folder, not a checkpoint; give a checkpoint file written "
                                       "by train.py, e.g. outputs/<run>/checkpoints/best.pt to python -m "
                                       "recog.export.\n")
    shutil.copy(classifier[2] / "last.pt", run / "checkpoints" / "best.pt")
    assert main([str(run), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: {run} is a folder, not a checkpoint; give a checkpoint file inside "
                                       f"it, e.g. {run / 'checkpoints' / 'best.pt'} to python -m recog.export.\n")
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_written_is_one_sentence(classifier, tmp_path, capsys):
    from recog.export import main

    (tmp_path / "file").write_text("")
    assert main([str(classifier[2] / "last.pt"), str(tmp_path / "file" / "out"), "--no-onnx"]) == 2
    assert capsys.readouterr().err == (f"error: cannot write to {tmp_path / 'file' / 'out'} (Not a directory); "
                                       "check the folder and its permissions.\n")


@pytest.mark.slow  # runs the CLI as a process
def test_export_onto_a_full_disk_is_one_sentence(classifier, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", disk], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        result = run_module("export", classifier[2] / "last.pt", disk / "out", "--no-onnx")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr == (f"error: cannot write to {disk / 'out'} (No space left on device); free some space "
                                 "or choose another folder.\n")
        assert not (disk / "out" / "model.json").exists()
        assert [p.name for p in (disk / "out").iterdir()] == [".recog.lock"]  # no temporary file left behind
    finally:
        subprocess.run(["umount", disk], check=True)


def test_an_export_holds_only_raw_tensors_and_aten_operators(classifier):
    """What torch 2.14 writes for recog's model passes the readers' check: no entry is pickled but the sample
    inputs, which a weights_only load reads."""
    path = classifier[2] / "export" / "embedder.pt2"
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/")[0]
        weights = json.loads(archive.read(f"{root}/{WEIGHTS_CONFIG}"))["config"]
    assert weights and not any(meta["use_pickle"] for meta in weights.values())
    assert pt2_problem(path.read_bytes()) is None


def crafted(classifier, tmp_path, attack: str):
    folder, marker = tmp_path / "crafted", tmp_path / "ran-code"
    shutil.copytree(classifier[2] / "export", folder)
    edit, runs = ATTACKS[attack]
    rewrite_archive(folder / "embedder.pt2", lambda records: edit(records, marker))
    return folder, marker, runs


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_an_export_crafted_to_run_code_is_refused_unread(classifier, tmp_path, attack):
    folder, marker, _ = crafted(classifier, tmp_path, attack)
    with pytest.raises(ConfigError) as refusal:
        ExportedEmbedder(folder)
    assert not marker.exists()
    message = str(refusal.value)
    assert message.startswith(f"{folder / 'embedder.pt2'} ") and "\n" not in message
    assert message.endswith("which recog does not load (loading it could run code); export the checkpoint again "
                            "with python -m recog.export.")


@pytest.mark.parametrize("attack", [name for name, (_, runs) in ATTACKS.items() if runs])
def test_torch_export_load_alone_runs_the_crafted_code(classifier, tmp_path, attack):
    """Why the refusal above: torch 2.14's own loader runs each of these payloads (if a later torch stops, this
    fails, and the refusal may be narrowed)."""
    folder, marker, runs = crafted(classifier, tmp_path, attack)
    try:
        program = torch.export.load(folder / "embedder.pt2").module()
        if runs == "call":
            program(random_images(2, 0))
    except Exception:  # the payload's value is no tensor: torch fails, after running it
        pass
    assert marker.exists()


def test_a_device_given_as_the_checkpoint_is_one_sentence(tmp_path, capsys):
    from recog.export import main

    assert main(["/dev/zero", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("error: /dev/zero is not a regular file (a device, FIFO or socket); give "
                                       "python -m recog.export a checkpoint file written by train.py.\n")


@pytest.mark.parametrize("edit, words", [
    (lambda info: info["files"].update(pt2="../../elsewhere.pt2"), "which is not a plain file name inside its folder"),
    (lambda info: info.pop("preprocess"), "lacks or garbles what a recog export's model.json says"),
    (lambda info: info["input"].update(channels="3"), "lacks or garbles what a recog export's model.json says"),
])
def test_a_model_json_that_names_a_file_elsewhere_or_lacks_a_field_is_one_sentence(classifier, tmp_path, edit,
                                                                                   words):
    folder = tmp_path / "export"
    shutil.copytree(classifier[2] / "export", folder)
    info = json.loads((folder / "model.json").read_text())
    edit(info)
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=words):
        ExportedEmbedder(folder)
