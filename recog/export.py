"""Export a trained model's embedder for serving: `python -m recog.export CHECKPOINT OUT_DIR`.

Writes into OUT_DIR, each file atomically, `model.json` last (its presence means the export is complete):

- `embedder.pt2`: `torch.export` program, uint8 images N×C×S×S in (any N), L2-normalised float32 embeddings
  N×D out. The normalisation `(x / 255 - mean) / std` is inside the graph, so a consumer needs only to decode,
  resize and crop (model.json says how) and cannot get the statistics wrong. The classifier is left out.
- `embedder.onnx`: the same program in ONNX (dynamic batch axis), when `onnx` and `onnxscript` are installed
  (`pip install 'recog[onnx]'`).
- `model.json`: what the program expects and gives: channels, image size, the resize/crop rule, mean and std,
  embedding width, class names, the checkpoint's sha256 (which embeddings and indexes made with this export
  carry, so that vectors of different models are never mixed) and the recog version.

The format (its file names, what model.json holds, what embedder.pt2 may hold and the check that refuses
anything else) is the reader's, recog.exported: this writer checks its program as every reader does
(`pt2_problem`) before model.json is written, so an export this recog writes is one it will load.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import recog
from recog.checkpoint import load_checkpoint, trained_class_names
from recog.errors import ConfigError
from recog.exported import FORMAT, MODEL_JSON, ONNX, PREPROCESS, PT2, pt2_problem
from recog.files import atomic_write, disk_error, exclusive, sha256_of, write_json
from recog.model import RecognitionModel, state_mismatch
from recog.shell import run_command

MAX_BATCH = 1 << 16  # the export's batch dimension ranges over 1..MAX_BATCH


class Embedder(nn.Module):
    """uint8 images -> L2-normalised embeddings: the model's backbone and embedding head, with the training
    run's normalisation in front (the same arithmetic as recog.data.normalize.Normalize) and no classifier."""

    def __init__(self, model: RecognitionModel, mean: list[float], std: list[float]):
        super().__init__()
        self.backbone, self.embed = model.backbone, model.embed
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return F.normalize(self.embed(self.backbone(x)), dim=1)




def read_checkpoint(path: str | Path, option: str = "python -m recog.export") -> dict:
    """A checkpoint written by train.py, or one sentence saying why this file is not one. `option`: where the
    path came from, for the message."""
    ckpt = load_checkpoint(path, option)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or \
            not isinstance(ckpt.get("config"), dict):
        raise ConfigError(f"{path} is not a recog checkpoint (it has no model and config); give a checkpoint "
                          "written by train.py, e.g. outputs/<run>/checkpoints/best.pt.")
    return ckpt


def data_settings(config: dict, path: str | Path) -> dict:
    """channels, image_size, mean, std as the run settled them (train.py saves the config after data.*=auto)."""
    data = config.get("data", {})
    settings = {key: data.get(key) for key in ("channels", "image_size", "mean", "std")}
    unsettled = [key for key, value in settings.items() if value in (None, "auto")]
    if unsettled:
        raise ConfigError(f"the config in {path} does not say data.{unsettled[0]}; export a checkpoint written by "
                          "a run of this recog version, which saves the values it chose.")
    return settings


def rebuild_model(ckpt: dict, path: str | Path) -> RecognitionModel:
    """The model the checkpoint's config describes, with its weights. Built directly rather than through Hydra's
    `_target_`: a checkpoint's config must not name arbitrary code to run."""
    config = ckpt["config"]
    spec = dict(config.get("model", {}))
    target = spec.pop("_target_", "recog.model.RecognitionModel")
    if target != "recog.model.RecognitionModel":
        raise ConfigError(f"{path} holds a {target} model; recog.export exports recog.model.RecognitionModel only.")
    state = ckpt["model"]
    sharded = spec.get("classifier") == "sharded"  # its rows lie in slice files beside it: the export embeds only
    if "class_weights" not in state and not sharded:
        raise ConfigError(f"{path} holds no recog model weights (no class_weights); export a checkpoint written "
                          "by train.py.")
    spec["pretrained"] = False  # the checkpoint holds the trained weights: no pretrained file or download
    try:
        model = RecognitionModel(num_classes=0 if sharded else state["class_weights"].shape[0],
                                 in_channels=data_settings(config, path)["channels"], **spec)
    except TypeError as e:
        raise ConfigError(f"the model settings in {path} do not fit this recog version ({e}); export it with "
                          "the recog version that trained it.") from None
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"the weights in {path} do not fit the model its config describes ({problem}); "
                          "the checkpoint is damaged: export another one.")
    model.load_state_dict(state)
    return model.eval()


def class_count(ckpt: dict, model: RecognitionModel) -> int:
    """The classes the model was trained on: its classifier's rows, or (model.classifier=sharded, rows not in the
    model) the checkpoint's class names."""
    return model.class_weights.shape[0] if model.class_weights is not None else len(ckpt.get("classes") or [])


def training_class_names(ckpt: dict, num_classes: int) -> tuple[list[str], str]:
    """The training classes' names, and where they came from: the checkpoint, the training shards' manifest
    (a local folder that still exists), the data config's named preset (checkpoint.trained_class_names), else
    '0', '1', ..."""
    names, found = trained_class_names(ckpt, num_classes)
    if names is None:
        return [str(i) for i in range(num_classes)], "class indices (no names found)"
    return names, found


def describe(ckpt: dict, path: Path, model: RecognitionModel, classes: list[str]) -> dict:
    settings = data_settings(ckpt["config"], path)
    return {
        "format": FORMAT,
        "recog_version": recog.__version__,
        "checkpoint": {"name": path.name, "sha256": sha256_of(path), "step": ckpt.get("step"),
                       "epoch": ckpt.get("epoch")},
        "backbone": ckpt["config"]["model"].get("backbone"),
        "input": {"dtype": "uint8", "layout": "NCHW", "channels": settings["channels"],
                  "image_size": settings["image_size"], "normalized_inside": True},
        "preprocess": {"size": settings["image_size"], **PREPROCESS},
        "mean": list(settings["mean"]),
        "std": list(settings["std"]),
        "embedding_dim": model.embed.out_features,
        "output": {"dtype": "float32", "l2_normalized": True},
        "classes": classes,
        "files": {"pt2": PT2},
    }


def export_program(embedder: Embedder, channels: int, size: int) -> torch.export.ExportedProgram:
    example = torch.zeros(2, channels, size, size, dtype=torch.uint8)  # 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(embedder, (example,), dynamic_shapes=({0: batch},))


def onnx_available() -> bool:
    """torch's ONNX exporter needs onnx and onnxscript."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript"))


def save_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    onnx_program = torch.onnx.export(program, input_names=["images"], output_names=["embeddings"],
                                     dynamo=True, verbose=False)
    # One file, weights inside (recog's models are far below protobuf's 2 GB limit).
    atomic_write(path, lambda f: f.write(onnx_program.model_proto.SerializeToString()))


def check_out_dir(out_dir: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier export unless asked; files of other names in OUT_DIR are left alone."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give an output folder.")
    if (out_dir / MODEL_JSON).exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds an export ({MODEL_JSON}); choose another folder or pass "
                          "--overwrite to replace it.")
    if checkpoint.resolve().parent == out_dir.resolve() and checkpoint.name in (PT2, ONNX, MODEL_JSON):
        raise ConfigError(f"the checkpoint {checkpoint} would be overwritten by the export; choose another folder.")


def export(checkpoint: str | Path, out_dir: str | Path, onnx: bool = True, overwrite: bool = False,
           ema: bool = False) -> dict:
    """Write the export of `checkpoint` into `out_dir` (one export at a time there); returns what model.json says.
    The program is checked as readers check it (pt2_problem) before anything is written. `ema`: the weights'
    moving average (ema.decay > 0, recog/ema.py) rather than the raw weights."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_out_dir(out_dir, checkpoint, overwrite)
    ckpt = read_checkpoint(checkpoint)
    if ema:
        ckpt = ema_weights(ckpt, checkpoint)
    model = rebuild_model(ckpt, checkpoint)
    classes, classes_from = training_class_names(ckpt, class_count(ckpt, model))
    info = describe(ckpt, checkpoint, model, classes) | {"classes_from": classes_from}
    if ema:
        mark_ema(info)
    embedder = Embedder(model, info["mean"], info["std"]).eval()
    program = export_program(embedder, info["input"]["channels"], info["input"]["image_size"])
    pt2 = io.BytesIO()
    torch.export.save(program, pt2)
    problem = pt2_problem(pt2.getvalue())
    if problem:  # not the user's doing: this torch writes what recog's readers refuse
        raise RuntimeError(f"the export of {checkpoint} {problem}; recog.exported would refuse it.")
    try:
        with exclusive(out_dir, "export"):
            check_out_dir(out_dir, checkpoint, overwrite)  # again: another export may have finished meanwhile
            (out_dir / MODEL_JSON).unlink(missing_ok=True)  # an earlier export (--overwrite) is incomplete from here
            atomic_write(out_dir / PT2, lambda f: f.write(pt2.getbuffer()))
            if onnx and onnx_available():
                save_onnx(program, out_dir / ONNX)
                info["files"]["onnx"] = ONNX
            write_json(info, out_dir / MODEL_JSON)
    except OSError as e:  # a full disk, a read-only folder, OUT_DIR under a file
        raise disk_error(e, out_dir) from None
    return info


def ema_weights(ckpt: dict, path: Path) -> dict:
    """The checkpoint with its EMA weights as its model's, or one sentence when it holds none."""
    if not isinstance(ckpt.get("ema"), dict):
        raise ConfigError(f"{path} holds no EMA weights (its run trained with ema.decay=0); export it without --ema, "
                          "or train with ema.decay above 0.")
    return {**ckpt, "model": ckpt["ema"]}


def mark_ema(info: dict) -> None:
    """model.json of an EMA export: says so, and carries an identity of its own (the checkpoint's sha256 with
    ":ema"), so that its embeddings are never mixed with those of the same checkpoint's raw weights."""
    sha = info["checkpoint"]["sha256"]
    info["weights"] = "ema"
    info["checkpoint"] |= {"file_sha256": sha, "sha256": hashlib.sha256(f"{sha}:ema".encode()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recog.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint written by train.py (e.g. outputs/<run>/checkpoints/best.pt)")
    parser.add_argument("out_dir", help="folder for embedder.pt2, embedder.onnx and model.json")
    parser.add_argument("--no-onnx", action="store_true", help="write embedder.pt2 and model.json only")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    parser.add_argument("--ema", action="store_true", help="export the weights' moving average (ema.decay > 0)")
    return run_command(lambda: export_and_say(parser.parse_args(argv)))


def export_and_say(args: argparse.Namespace) -> None:
    info = export(args.checkpoint, args.out_dir, onnx=not args.no_onnx, overwrite=args.overwrite, ema=args.ema)
    files = ", ".join(info["files"].values())
    print(f"{args.out_dir}: {files}, {MODEL_JSON} | {info['backbone']}, {info['input']['channels']} channel(s), "
          f"{info['input']['image_size']} px, {info['embedding_dim']}-d embeddings, {len(info['classes'])} classes "
          f"(names from {info['classes_from']}){', EMA weights' if args.ema else ''}")
    if not args.no_onnx and "onnx" not in info["files"]:
        print(f"{ONNX} not written: install onnx and onnxscript (pip install 'recog[onnx]')", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
