"""An export (written by `python -m recog.export`) put to use: images in, embeddings out. This module is the
export format's home: its file names, what model.json says, and what embedder.pt2 may hold; the writer,
recog.export, imports them from here.

Preprocessing is what model.json says, the same rule as every augment preset's `test` transform: decode as grey
or RGB, resize the shorter side to the image size, crop the centre square. Normalisation is inside the exported
program, so this module hands it uint8 pixels only.

Every file is hostile until read: embedder.pt2 is read into memory once and checked (check_pt2: raw tensors and
ATen operators only, nothing pickled) before torch.export.load sees those same bytes; an image must be a regular
file (a FIFO or a device is refused before it is opened for reading), at most `max_bytes`, and at most
`max_pixels` by its header before any pixel is decoded.

Nothing from a file runs code, and `torch.export.load` can be made to: it unpickles (weights_only=False) a
weight or constant marked `use_pickle`, custom and opaque objects, and sample inputs that fail a weights_only
load; it evaluates every symbolic size (`sympy.sympify`), executes the program's `guards_code`, and calls any
function reachable from `torch`, `operator` or `math` that a graph node names. So `pt2_problem` describes what
a recog export may hold, and this reader refuses anything else before torch sees the file: raw tensors only,
ATen operators only, sizes that are plain arithmetic on symbols. recog.export checks its program the same way
before it writes model.json, so an export this recog writes is one it will load.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from recog.data.decode import MAX_SIDE_RATIO, ImageRefused, decode_image, header_size
from recog.errors import ConfigError
from recog.files import plain_name

FORMAT = "recog-embedder/1"
MODEL_JSON, PT2, ONNX = "model.json", "embedder.pt2", "embedder.onnx"
# the resize/crop rule of every augment preset's `test` transform (conf/augment/*.yaml): what Preprocess repeats
PREPROCESS = {"resize": "shorter_side", "interpolation": "bilinear", "antialias": True, "crop": "center"}
MAX_IMAGE_MB = 50.0  # the largest image file read (recog.identify --max-mb)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # the largest image decoded, by its header (PIL's decompression-bomb limit)
MAX_PT2_BYTES = 8 << 30  # embedder.pt2 is read whole; recog's models are far smaller
MAX_JSON_BYTES = 64 << 20  # model.json: class names and a few numbers


# What embedder.pt2 may hold (torch.export.save of one program, named "model"): the archive's version records,
# the program's JSON, the configs of its weights and constants, their raw bytes, and its sample inputs.
PT2_RECORDS = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                         r"|models/model\.json|data/sample_inputs/model\.pt"
                         r"|data/(weights/model_weights|constants/model_constants)_config\.json"
                         r"|data/weights/weight_\d+|data/constants/tensor_\d+")
# graph nodes: ATen operators (and getitem on their tuples); anything else names a Python function to call
PT2_TARGET = re.compile(r"torch\.ops\.aten\.\w+\.\w+|_operator\.getitem")
# a symbolic size is sympify'd (Python's eval): sympy's constructors, symbol names and integers only
PT2_EXPRESSION = re.compile(r"\s*(?:(?:Symbol|Integer|Add|Mul|Pow|Rational|FloorDiv|CleanDiv|CeilDiv|Mod|PythonMod"
                            r"|CeilToInt|FloorToInt|Max|Min)\(|'[a-z]+\d+'|[a-z]+\d+|\d{1,18}|[-+*/(),]"
                            r"|(?:positive|integer|nonnegative|real|finite)=(?:True|False))")
PT2_ARGUMENTS_REFUSED = ("as_graph", "as_operator", "as_custom_obj")  # a subgraph, a function, a pickled object


def plain_expression(text: object) -> bool:
    if not isinstance(text, str) or len(text) > 2000:
        return False
    at = 0
    while at < len(text):
        token = PT2_EXPRESSION.match(text, at)
        if token is None:
            return False
        at = token.end()
    return True


def payload_problem(config: dict, folder: str, prefix: str, records: set[str], limit: int) -> str | None:
    """A weights or constants config (`{"config": {name: PayloadMeta}}`): every entry raw bytes, none pickled, of
    at most `limit` elements (the archive's size: torch allocates a tensor of an empty record's sizes)."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        return f"has no readable data/{folder}/ config"
    for name, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False or meta.get("tensor_meta") is None:
            return f"holds {name[:60]!r} as a pickled object"
        path = meta.get("path_name")
        if not (isinstance(path, str) and re.fullmatch(rf"{prefix}\d+", path)
                and f"data/{folder}/{path}" in records):
            return f"names {str(path)[:40]!r} for {name[:60]!r}, not a tensor file of the archive"
        sizes = [size.get("as_int") for size in meta["tensor_meta"].get("sizes")]
        if not all(type(size) is int and size >= 0 for size in sizes) or math.prod(sizes) > limit:
            return f"gives {name[:60]!r} sizes that its bytes cannot hold"
    return None


def program_problem(program: dict, in_spec: str, out_spec: str) -> str | None:
    """What in models/model.json would run code: guards code, a node that calls a Python function, a symbolic size
    that is not arithmetic, an input that is not a tensor, a calling convention other than embed(images)."""
    graph_module = program.get("graph_module") if isinstance(program, dict) else None
    if not isinstance(graph_module, dict) or not isinstance(graph_module.get("graph"), dict):
        return "holds no program"
    if program.get("guards_code"):
        return "holds guards code (Python that torch would execute)"
    if any(set(arg) != {"as_tensor"} for arg in graph_module["graph"].get("inputs", [None])):
        return "has a program input that is not a tensor"
    calls = graph_module.get("module_call_graph") or [{}]
    signature = calls[0].get("signature") or {}
    if signature.get("in_spec") != in_spec or signature.get("out_spec") != out_spec or \
            any(call.get("signature") is not None for call in calls[1:]):
        return "does not take images and give embeddings as a recog export does"
    for name, limits in (program.get("range_constraints") or {}).items():
        if not (re.fullmatch(r"[a-z]+\d+", name) and isinstance(limits, dict)
                and all(value is None or type(value) is int for value in limits.values())):
            return f"has a size constraint on {name[:40]!r} that is not a number range"
    found = []

    def walk(value) -> None:
        if isinstance(value, dict):
            if "target" in value and "inputs" in value and not (isinstance(value["target"], str)
                                                                 and PT2_TARGET.fullmatch(value["target"])):
                found.append(f"calls {str(value['target'])[:60]!r}, not an ATen operator")
            if any(value.get(key) is not None for key in PT2_ARGUMENTS_REFUSED):
                found.append("passes a subgraph, function or object to an operator")
            if "expr_str" in value and not plain_expression(value["expr_str"]):
                found.append(f"has a symbolic size {str(value['expr_str'])[:60]!r} that is not arithmetic")
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(graph_module)
    return found[0] if found else None


def pt2_problem(data: bytes) -> str | None:
    """Why `data` is not an embedder.pt2 recog loads, as the end of a sentence that starts with its path; None
    when it holds only what a recog export holds (see the module's docstring). Reads JSON and raw bytes; the one
    pickle it opens, the sample inputs, it opens with weights_only=True, as torch would first."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "is not a torch.export archive (not a zip file)"
    root = names[0].split("/")[0] if names else ""
    records = {name[len(root) + 1:] for name in names if name.startswith(root + "/")}
    if len(records) != len(names):
        return "holds files outside its archive folder, or one name twice"
    unknown = sorted(name for name in records if not PT2_RECORDS.fullmatch(name))
    if unknown:
        return f"holds {unknown[0][:60]!r} (compiled code, a pickled object or another program)"
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))  # what torch.export.load reads with
        if reader.get_record("archive_format") != b"pt2":
            return "is not a torch.export archive"
        for folder, prefix in (("weights", "weight_"), ("constants", "tensor_")):
            config = json.loads(reader.get_record(f"data/{folder}/model_{folder}_config.json"))
            problem = payload_problem(config, folder, prefix, records, len(data))
            if problem:
                return problem
        program = json.loads(reader.get_record("models/model.json"))
        sample_inputs = reader.get_record("data/sample_inputs/model.pt")
        example = ((torch.zeros(1),), {})  # embed(images): one tensor in, one out
        in_spec = torch.utils._pytree.treespec_dumps(torch.utils._pytree.tree_structure(example))
        out_spec = torch.utils._pytree.treespec_dumps(torch.utils._pytree.tree_structure(torch.zeros(1)))
        problem = program_problem(program, in_spec, out_spec)
    # a record missing, not JSON, nested too deep (RecursionError), or JSON of other shapes than torch writes
    except (RuntimeError, ValueError, UnicodeDecodeError, TypeError, AttributeError, KeyError):
        return "is damaged or not a complete torch.export archive"
    if problem:
        return problem
    try:  # torch tries weights_only=True first and falls back to an unrestricted load: that must never be needed
        torch.load(io.BytesIO(sample_inputs), weights_only=True)
    except Exception:  # the restricted unpickler refuses with many kinds
        return "holds sample inputs that are not plain tensors"
    return None


def check_pt2(data: bytes, path: str | Path) -> None:
    """One sentence unless `data` (the bytes of `path`) holds only what a recog export holds: see pt2_problem."""
    problem = pt2_problem(data)
    if problem:
        raise ConfigError(f"{path} {problem}, which recog does not load (loading it could run code); export the "
                          "checkpoint again with python -m recog.export.")


def read_regular_file(path: str | Path, max_bytes: int, what: str, fix: str) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes`, else one sentence. Opened without
    blocking (a FIFO would wait for a writer) and checked with fstat on that descriptor, so that a device
    (/dev/zero), a FIFO or a folder is refused before a byte is read; at most max_bytes + 1 are ever read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror or e}); {fix}.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, FIFO or socket)"
            raise ConfigError(f"{what} {path} is {kind}; {fix}.")
        if info.st_size > max_bytes:
            raise ConfigError(f"{what} {path} is {info.st_size / 2**20:,.1f} MB, more than the "
                              f"{max_bytes / 2**20:,.1f} MB read; {fix}.")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # a file that grows meanwhile is cut off here, not read on
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror or e}); {fix}.") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ConfigError(f"{what} {path} grew past {max_bytes / 2**20:,.1f} MB while being read; {fix}.")
    return data


def read_model_json(folder: str | Path) -> dict:
    path = Path(folder) / MODEL_JSON
    if not path.exists():
        raise ConfigError(f"no {MODEL_JSON} in {folder}; give a folder written by python -m recog.export.")
    data = read_regular_file(path, MAX_JSON_BYTES, "export description", "export the checkpoint again")
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON ({str(e)[:80]}); export the checkpoint again.") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a recog export's {MODEL_JSON} (format {FORMAT}); give a folder written by "
                          "python -m recog.export.")
    try:  # what readers use, so that a hand-edited model.json is one sentence, not a KeyError
        channels, size = info["input"]["channels"], info["preprocess"]["size"]
        Preprocess.of(info)
        valid = (channels in (1, 3) and type(size) is int and 0 < size <= 4096 and type(info["embedding_dim"]) is int
                 and isinstance(info["checkpoint"]["sha256"], str) and isinstance(info["classes"], list))
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid or not isinstance(info.get("files"), dict):
        raise ConfigError(f"{path} lacks or garbles what a recog export's {MODEL_JSON} says (files, input, "
                          "preprocess, embedding_dim, checkpoint, classes); export the checkpoint again.")
    plain_name(info["files"].get("pt2"), path, "export the checkpoint again")  # never a path to another folder
    return info


@dataclass(frozen=True)
class Preprocess:
    """uint8 C×H×W -> uint8 C×S×S: shorter side resized to S, centre crop (model.json's `preprocess`). A plain
    value, so that data-loader workers can apply it (recog.embed)."""

    size: int
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    @classmethod
    def of(cls, info: dict) -> Preprocess:
        pre = info["preprocess"]
        return cls(pre["size"], InterpolationMode(pre.get("interpolation", "bilinear")))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = TF.resize(image, self.size, interpolation=self.interpolation, antialias=True)
        return TF.center_crop(image, [self.size, self.size])


def load_program(path: Path, folder: str | Path, device: torch.device | None = None) -> torch.nn.Module:
    """embedder.pt2's program, from bytes that check_pt2 found free of anything that runs code when loaded; on
    `device` (a GPU: torch.export's own pass moves its weights and the devices its operators name)."""
    fix = f"export the checkpoint again into {folder}"
    if not path.exists():
        raise ConfigError(f"{path} is missing; {fix}.")
    data = read_regular_file(path, MAX_PT2_BYTES, "the exported program", fix)
    check_pt2(data, path)
    try:  # these bytes, not the file again: it could be changed between the check and the load
        program = torch.export.load(io.BytesIO(data))
        if device is not None and device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return program.module()
    except Exception as e:  # a damaged or foreign file: torch raises many kinds
        raise ConfigError(f"{path} could not be loaded ({type(e).__name__}); {fix}.") from None


def read_image(path: str | Path, max_bytes: int = int(MAX_IMAGE_MB * 2**20), max_pixels: int = MAX_PIXELS) -> bytes:
    """An image file's bytes, refused in one sentence unless it is a regular file of at most `max_bytes` whose
    header says at most `max_pixels` pixels, sides within MAX_SIDE_RATIO of each other: nothing is decoded yet,
    so a decompression bomb costs its header."""
    data = read_regular_file(path, max_bytes, "image", "give an image file (--max-mb raises the limit)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # an error here, not a line on stderr
            header_size(data, max_pixels)
    except ImageRefused as e:
        if e.why == "not an image":
            raise ConfigError(f"{path} is not an image that can be decoded ({e.cause}); give a PNG, JPEG or WebP "
                              "file.") from None
        if e.why == "too thin":
            raise ConfigError(f"{path} is {e.width}×{e.height} pixels, too thin to resize (its sides differ by more "
                              f"than {MAX_SIDE_RATIO}:1); give a photo of the object.") from None
        size = f"is {e.width}×{e.height} pixels, more" if e.width else "has more pixels"
        raise ConfigError(f"{path} {size} than the {max_pixels:,} decoded (--max-pixels, a decompression-bomb "
                          "limit); give a smaller image.") from None
    return data


class ExportedEmbedder:
    """embedder.pt2 with its model.json: `load_image` -> `preprocess` -> `embed` (on `device`; the images and
    embeddings stay on the CPU)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        self.folder, self.device = Path(folder), torch.device(device)
        self.info = read_model_json(folder)
        self.program = load_program(self.folder / self.info["files"]["pt2"], folder, self.device)
        self.channels, self._preprocess = self.info["input"]["channels"], Preprocess.of(self.info)
        self.size, self.interpolation = self._preprocess.size, self._preprocess.interpolation

    @property
    def sha256(self) -> str:
        """The checkpoint's sha256: what embeddings and indexes made with this export carry."""
        return self.info["checkpoint"]["sha256"]

    @property
    def dim(self) -> int:
        return self.info["embedding_dim"]

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 C×H×W -> uint8 C×S×S: shorter side resized to S, centre crop."""
        return self._preprocess(image)

    def load_image(self, path: str | Path, max_bytes: int = int(MAX_IMAGE_MB * 2**20),
                   max_pixels: int = MAX_PIXELS) -> torch.Tensor:
        """An image file, decoded and preprocessed; one sentence if it cannot be (see read_image)."""
        return self.decode(read_image(path, max_bytes, max_pixels), path)

    def decode(self, data: bytes, path: str | Path) -> torch.Tensor:
        """The bytes of an image file that read_image accepted -> the program's uint8 C×S×S input."""
        try:
            image = decode_image(data, self.channels)
        except Exception as e:  # PIL raises many kinds on a file that is not an image
            raise ConfigError(f"{path} is not an image that can be decoded ({type(e).__name__}); give a PNG, JPEG "
                              "or WebP file.") from None
        return self.preprocess(image)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """uint8 N×C×S×S -> float32 N×D, unit length."""
        out = [self.program(images[i : i + batch_size].to(self.device)).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)
