"""What the export, index and identify tests make: checkpoints of the real configs, real test images, and
embeddings folders of synthetic clustered vectors."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from conftest import BUNDLED, ROOT
from omegaconf import OmegaConf

from recog.checkpoint import save_checkpoint
from recog.data.idx import find_idx_pair
from recog.data.write import FASHION_MNIST_CLASSES, idx_records
from recog.embeddings import part_name, write_manifest, write_part
from recog.model import RecognitionModel
from recog.rundir import compose_train_config

# what the bundled Fashion-MNIST subset's manifest says (train.py settles data.*=auto to these)
FASHION_DATA = ["data.channels=1", "data.image_size=28", "data.mean=[0.2853]", "data.std=[0.3541]"]


def config(*overrides: str) -> dict:
    """The real train config, composed and resolved as train.py saves it into its checkpoints."""
    return OmegaConf.to_container(compose_train_config(*FASHION_DATA, *overrides), resolve=True)


def random_checkpoint(path: Path, *overrides: str, seed: int = 0) -> RecognitionModel:
    """A model with random weights (and BatchNorm statistics, so eval mode is not the identity), saved with the
    two entries of a training checkpoint that export reads: the state dict and the resolved config."""
    cfg = config(*overrides)
    torch.manual_seed(seed)
    spec = {k: v for k, v in cfg["model"].items() if k != "_target_"}
    model = RecognitionModel(num_classes=10, in_channels=cfg["data"]["channels"], **spec)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
    save_checkpoint({"model": model.state_dict(), "config": cfg, "epoch": 1, "step": 1}, path)
    return model.eval()


def fashion_test_images(folder: Path, count: int) -> list[tuple[Path, int]]:
    """The first `count` images of the bundled Fashion-MNIST test set as PNG files, with their labels."""
    records, _ = idx_records(*find_idx_pair(BUNDLED, "test"), FASHION_MNIST_CLASSES)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, record in enumerate(records[:count]):
        path = folder / f"test-{i:04d}.png"
        path.write_bytes(record.read())
        out.append((path, record.label))
    return out


def clustered(count: int, dim: int = 128, clusters: int = 100, rank: int = 8, seed: int = 0) -> np.ndarray:
    """Unit vectors near `clusters` centres, each cluster spread over its own `rank`-dimensional subspace: like
    a trained model's embeddings (classes, low intrinsic dimension), unlike isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    bases = rng.standard_normal((clusters, rank, dim)).astype(np.float32) * (0.7 / np.sqrt(rank))
    which = rng.integers(0, clusters, count)
    x = centres[which] + np.einsum("kr,krd->kd", rng.standard_normal((count, rank)).astype(np.float32),
                                   bases[which])
    x += 0.02 * rng.standard_normal((count, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(folder: Path, vectors: np.ndarray, part_size: int, sha256: str = "a" * 64,
                     first_key: int = 0, classes: int = 10, dtype: str = "float32", labels=None) -> Path:
    """An embeddings folder of `vectors` (stored as `dtype`), keys 'k<id>' and `labels` (default id % `classes`)."""
    parts = []
    for number, start in enumerate(range(0, len(vectors), part_size)):
        ids = np.arange(start, min(start + part_size, len(vectors))) + first_key
        mine = ids % classes if labels is None else np.asarray(labels)[start : start + part_size]
        parts.append(write_part(folder, part_name(number), vectors[start : start + part_size].astype(dtype),
                                [f"k{i}" for i in ids], mine))
    write_manifest(folder, sha256, vectors.shape[1], dtype, parts, [f"class{i}" for i in range(classes)])
    return folder


def run_module(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m recog.<module> ...` as a user runs it, with this checkout's recog first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"recog.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def embed_gallery(export_dir: Path, shards: Path, out: Path, *settings: str) -> Path:
    """`python -m recog.embed` at world size 1 (one process, no data-loader worker) as a user runs it: the
    embeddings of every sample of `shards` in `out`."""
    result = run_module("embed", f"model={export_dir}", f"data={shards}", f"out={out}", "num_workers=0", *settings,
                        timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


class WritesMarker:
    """Unpickled, it creates the file `marker`: the proof that loading ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(WritesMarker(marker), buffer)
    return buffer.getvalue()


def rewrite_archive(path: Path, change) -> None:
    """Rewrite the zip `path` after `change(records)` edits its records (name inside the archive folder -> bytes;
    a name starting with / is put at the top of the zip, outside that folder)."""
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/")[0]
        records = {name[len(root) + 1:]: archive.read(name) for name in archive.namelist()}
    change(records)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name[1:] if name.startswith("/") else f"{root}/{name}", data)  # "/x": at the top


def edit_json(records: dict, name: str, edit) -> None:
    value = json.loads(records[name])
    edit(value)
    records[name] = json.dumps(value).encode()


WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


def first_node(records: dict, edit) -> None:
    edit_json(records, PROGRAM, lambda program: edit(program["graph_module"]["graph"]["nodes"][0]))


def first_size(records: dict, expression: str) -> None:
    def edit(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        sizes = next(v["sizes"] for v in values.values() if any("as_expr" in s for s in v["sizes"]))
        next(s for s in sizes if "as_expr" in s)["as_expr"]["expr_str"] = expression

    edit_json(records, PROGRAM, edit)


def constant(records: dict, path_name: str, data: bytes) -> None:
    """A constant the program does not even use: torch's loader reads every entry of the config."""
    records[f"data/constants/{path_name}"] = data
    edit_json(records, CONSTANTS_CONFIG, lambda c: c["config"].update(
        {"extra": {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}}))


def pickled_weight(records: dict, marker: Path) -> None:
    """The issue's payload: one weight marked use_pickle, its file a pickle that writes `marker`."""
    edit_json(records, WEIGHTS_CONFIG, lambda c: c["config"]["backbone.0.0.weight"].update(use_pickle=True))
    records["data/weights/weight_0"] = pickled(marker)


# Every way found for a torch 2.14 embedder.pt2 to run code of its own (torch/export/pt2_archive/_package.py,
# torch/_export/serde/serialize.py, torch/export/_unlift.py), as {name: (edit of the archive's records, when
# torch.export.load would run it: "load" (in .module()), "call" (when the program runs), None (torch's own
# checks stop it first, or the payload here is a stand-in))}. recog refuses every one before torch reads it.
ATTACKS = {
    "pickled weight": (pickled_weight, "load"),
    "pickled constant": (lambda r, m: constant(r, "tensor_0", pickled(m)), "load"),
    "opaque object constant": (lambda r, m: constant(r, "opaque_obj_0", pickle.dumps(WritesMarker(m))), "load"),
    "sample inputs": (lambda r, m: r.update({"data/sample_inputs/model.pt": pickled(m)}), "load"),
    "symbolic size": (lambda r, m: first_size(r, f"Symbol('s0', positive=True) if __import__('builtins').open("
                                                 f"{str(m)!r}, 'w') else 0"), "load"),
    "guards code": (lambda r, m: edit_json(r, PROGRAM, lambda p: p.update(
        guards_code=[f"__import__('builtins').open({str(m)!r}, 'w') is not None"])), "call"),
    # torch's verifier allows only operators here, and the others are stand-ins for a payload
    "node target": (lambda r, m: first_node(r, lambda node: node.update(
        target="torch.serialization.os.system", outputs=[{"as_none": True}],
        inputs=[{"name": "command", "arg": {"as_string": f"touch {m}"}, "kind": 1}])), None),
    "custom object constant": (lambda r, m: constant(r, "custom_obj_0", pickled(m)), None),
    "compiled code": (lambda r, m: r.update({"data/aotinductor/model/model.so": b"\x7fELF"}), None),
    "old format": (lambda r, m: r.update({"/version": b"1", "/serialized_state_dict.pt": pickled(m)}), None),
}


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 8-bit grey PNG of side×side black pixels (400 MB decoded at 20000) in a file of ~0.5 MB: its rows
    deflated in blocks that repeat after each full flush, the checksum computed over the whole."""
    rows = 100
    chunk = (b"\0" * (side + 1)) * rows  # each row: filter type 0, then its pixels
    deflate = zlib.compressobj(9)
    head = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.flush()[:-4]  # the final block, without the checksum of these few chunks
    checksum = 1
    for _ in range(side // rows):
        checksum = zlib.adler32(chunk, checksum)
    stream = head + block * (side // rows - 1) + tail + checksum.to_bytes(4, "big")

    def chunk_of(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grey, deflate, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk_of(b"IHDR", header) + chunk_of(b"IDAT", stream)
                     + chunk_of(b"IEND", b""))
    return path


# One child runs identify's main on each case in turn, after the imports (torch alone: ~650 MB and seconds on a
# busy machine), which are not what is measured. Each case has `seconds` (SIGALRM ends the child: a FIFO that
# blocks fails the test) and the address space of the imports plus 1 GB (an unbounded read fails there instead
# of taking the machine's memory); its line on stdout: exit code, stderr, seconds taken, peak resident bytes.
BOUNDED = """
import contextlib, io, json, os, resource, signal, sys, time
from recog.identify import main
pages = int(open("/proc/self/statm").read().split()[0])
resource.setrlimit(resource.RLIMIT_AS, (pages * os.sysconf("SC_PAGE_SIZE") + (1 << 30), resource.RLIM_INFINITY))
seconds, cases = int(sys.argv[1]), json.loads(sys.argv[2])
for name, args in cases.items():
    err, start = io.StringIO(), time.monotonic()
    signal.alarm(seconds)
    with contextlib.redirect_stderr(err):
        code = main(args)
    signal.alarm(0)
    # VmHWM, this process's own peak: ru_maxrss keeps the peak of the process that forked it (pytest's, after
    # a suite's worth of tests) across exec
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
    print(json.dumps([name, code, err.getvalue(), time.monotonic() - start, peak]), flush=True)
"""


def identify_bounded(cases: dict[str, list], seconds: int = 10) -> dict[str, tuple[int, str, float, int]]:
    """{case: identify's arguments} -> {case: (exit code, stderr, seconds, peak resident bytes of the process so
    far)}, run as BOUNDED says; a case missing from the answer did not end (the child's stderr says why)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cases = {name: [str(arg) for arg in args] for name, args in cases.items()}
    result = subprocess.run([sys.executable, "-c", BOUNDED, str(seconds), json.dumps(cases)], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=600)  # the imports may be slow; not forever
    answers = {line[0]: tuple(line[1:]) for line in map(json.loads, result.stdout.splitlines())}
    return answers | {name: (result.returncode, result.stderr[-2000:], None, None) for name in cases
                      if name not in answers}
