"""A classifier sharded by rows across ranks, on disk: one safetensors file per writing rank, read back re-sliced for
any world size, with no rank ever holding the whole classifier.

A classifier of `total` rows (one per class; 10M classes x 512 fp32 is 20 GB) is split as torch.tensor_split splits
it: with W ranks, rank r holds the contiguous rows `recog.sharded.class_slice(r, W, total)`, the first total % W
ranks one row more. This module takes any contiguous rows and imports nothing from training.
Per-row optimizer state (AdamW's exp_avg and exp_avg_sq, the rows' shape) is saved beside the rows, under its own
name.

The folder (one per saved step; its name is the caller's):

    rows-0000000000-0002500000.safetensors   written by the rank that held rows [0, 2500000)
    rows-0002500000-0005000000.safetensors   ... one file per rank that held any row
    slices.json                              written last, by one rank: the folder is complete

- A slice file is a plain safetensors file (safetensors' own readers read it): each tensor (e.g. "weight",
  "exp_avg", "exp_avg_sq") has the file's rows as its leading dimension; its header's `__metadata__` holds
  format ("recog-classifier-rows/1"), total, start, stop and names (a JSON list). The digits in its name are its
  rows [start, stop), zero-padded to 10 so that names sort in row order. A rank writes it under a temporary
  name (`.rows-...safetensors.tmp-<pid>`) and then links it to its name, which never replaces a file already
  there: a killed writer leaves only a temporary file, never a short file under a slice's name.
- slices.json (JSON, written atomically by `finish` after every rank wrote) holds format, total, each tensor's
  dtype and trailing shape, and the slice files with their rows and byte sizes. It is written only after the
  files were checked to cover rows 0..total once each, so a folder without it (a save cut short) is refused.
- `read_rows` reads any rows from whatever world size wrote them: only the files that hold them are opened, and
  of each only those rows are read (safetensors' get_slice on a memory map). Each file's size, metadata, dtypes
  and shapes are checked against slices.json. The payload bytes are not checksummed: a reader reads a part of a
  file and could not check a whole-file digest without reading all of it.

Nothing read here is unpickled (safetensors and JSON), and slices.json names only plain names inside its folder.

A save and a resume, on every rank (the barriers and the agreeing are the caller's, recog.dist's):

    write_slice(folder, {"weight": w, "exp_avg": m, "exp_avg_sq": v}, class_slice(rank, world, total), total)
    barrier; on one rank: finish(folder, total, names); barrier      (then the step's checkpoint may name folder)
    ...
    got = fail_together(lambda: read_rows(folder, class_slice(rank, world, total), total=total), ...)

The slice files are written here rather than by safetensors' save_file, which first copies every tensor into
bytes: this writer streams one tensor at a time (a GPU tensor copied to the CPU one at a time), so a rank holds at
most its slice plus one tensor of it. Every reader checks slices.json and every file's size (a file cut short stops
every rank); a file damaged inside is found by the ranks that read its rows, hence fail_together. `remove` deletes
a folder of this format (retention), refusing one that holds anything else.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from recog.errors import ConfigError
from recog.files import fsync_dir, is_plain_name, write_json

FORMAT = "recog-classifier-rows/1"
SLICES_JSON = "slices.json"
DIGITS = 10  # of the row numbers in a slice file's name: up to 9,999,999,999 rows
SLICE_NAME = re.compile(r"rows-(\d{%d})-(\d{%d})\.safetensors" % (DIGITS, DIGITS))
TEMP_NAME = re.compile(r"\.(rows-\d+-\d+\.safetensors|slices\.json)\.tmp-\d+")  # ours, left by a killed writer
# torch dtype <-> safetensors' name for it (the dtypes a classifier or its optimizer state is kept in)
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


def slice_name(rows: range) -> str:
    return f"rows-{rows.start:0{DIGITS}d}-{rows.stop:0{DIGITS}d}.safetensors"


def _check_rows(rows: range, total: int) -> None:
    if not isinstance(rows, range) or rows.step != 1 or not 0 <= rows.start <= rows.stop <= total:
        raise ValueError(f"rows {rows} are not a contiguous range inside 0..{total}")
    if total >= 10**DIGITS:
        raise ValueError(f"{total} rows do not fit the {DIGITS} digits of a slice file's name")


def _header(tensors: dict[str, torch.Tensor], names: list[str], rows: range, total: int) -> bytes:
    """safetensors' header (8-byte length, then JSON padded with spaces to a multiple of 8) for `names` in order."""
    entries, offset = {}, 0
    for name in names:
        size = tensors[name].numel() * tensors[name].element_size()
        entries[name] = {"dtype": DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    metadata = {"format": FORMAT, "total": str(total), "start": str(rows.start), "stop": str(rows.stop),
                "names": json.dumps(sorted(names))}
    text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_tensor(f, tensor: torch.Tensor) -> None:
    """The tensor's bytes, little-endian and row-major as safetensors keeps them. One tensor at a time is copied to
    the CPU (a GPU slice never needs a second host copy of all of them)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    if data.numel():
        f.write(data.view(torch.uint8).numpy().data)


def write_slice(folder: str | Path, tensors: dict[str, torch.Tensor], rows: range, total: int) -> Path | None:
    """This rank's `rows` of a `total`-row classifier: each of `tensors` (name -> rows x ...) into
    `folder/rows-<start>-<stop>.safetensors`, written under a temporary name and then linked into place. A rank
    with no rows writes nothing (None). Refuses (one sentence) to replace a slice file already there."""
    _check_rows(rows, total)
    names = list(tensors)
    for name, tensor in tensors.items():
        if not name or name == "__metadata__" or not isinstance(name, str):
            raise ValueError(f"{name!r} cannot name a tensor in a slice file")
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{name} is {tensor.dtype}, which a slice file does not hold; give one of {list(DTYPES)}")
        if tensor.dim() < 1 or tensor.shape[0] != len(rows):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, not {len(rows)} rows (rows {rows})")
    if not len(rows):
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / slice_name(rows)
    if path.exists() or (folder / SLICES_JSON).exists():
        raise ConfigError(f"{path if path.exists() else folder / SLICES_JSON} already exists, written by an earlier "
                          f"save; remove the folder {folder} (classifier_files.remove) before saving into it again.")
    names.sort(key=lambda name: (-tensors[name].element_size(), name))  # each tensor aligned to its item size
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(_header(tensors, names, rows, total))
            for name in names:
                _write_tensor(f, tensors[name])
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # unlike a rename, never replaces a file another writer put there meanwhile
        except FileExistsError:
            raise ConfigError(f"{path} was written by another writer meanwhile; give each save its own "
                              "folder.") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(folder)
    return path


def _open(path: Path):
    """safe_open, with a file safetensors cannot read (damaged, cut short, not safetensors) as one sentence."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ConfigError(f"{path} cannot be read as a slice file ({why}): it is damaged or cut short; resume from "
                          "an earlier checkpoint.") from None


def _describe_slice(path: Path, f) -> tuple[range, int, dict[str, tuple[str, list[int]]]]:
    """A slice file's rows, total and tensors (name -> (dtype, shape)), after checking its metadata against its
    name and its tensors' leading dimension against its rows; one sentence naming the file where they disagree."""
    meta = f.metadata() or {}
    named = SLICE_NAME.fullmatch(path.name)
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
        rows, total = range(int(meta["start"]), int(meta["stop"])), int(meta["total"])
        names = json.loads(meta["names"])
        if not named or (int(named[1]), int(named[2])) != (rows.start, rows.stop):
            raise ValueError(f"rows {rows.start}..{rows.stop}, which its name does not say")
        tensors = {}
        for name in f.keys():
            part = f.get_slice(name)
            tensors[name] = (part.get_dtype(), list(part.get_shape()))
            if not tensors[name][1] or tensors[name][1][0] != len(rows):
                raise ValueError(f"{name} of shape {tensors[name][1]} for {len(rows)} rows")
        if sorted(tensors) != names:
            raise ValueError(f"tensors {sorted(tensors)}, its metadata names {names}")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a whole slice file of a classifier ({e}); resume from an earlier "
                          "checkpoint, or write this save again.") from None
    return rows, total, tensors


def finish(folder: str | Path, total: int, names: Iterable[str]) -> Path:
    """Mark `folder` complete: check that its slice files hold rows 0..`total` once each, each the tensors `names`
    in one dtype and trailing shape, and write slices.json. One rank calls it after every rank's write_slice
    returned (the caller's barrier). One sentence naming the file and the fix where the files do not fit."""
    folder, names = Path(folder), sorted(names)
    found = []
    for path in sorted(folder.glob("rows-*.safetensors")):
        with _open(path) as f:
            rows, file_total, tensors = _describe_slice(path, f)
        if file_total != total:
            raise ConfigError(f"{path} holds rows of a {file_total}-row classifier, not of {total} rows: it is left "
                              f"from another save; remove the folder {folder} and save again.")
        if sorted(tensors) != names:
            raise ConfigError(f"{path} holds tensors {sorted(tensors)}, not {names}: it is left from another save; "
                              f"remove the folder {folder} and save again.")
        found.append((rows, path, tensors))
    kinds, at, before = {}, 0, None
    for rows, path, tensors in found:  # sorted by start: names sort in row order
        if rows.start != at:
            what = f"rows {at}..{rows.start} are in no slice file" if rows.start > at else \
                f"rows {rows.start}..{min(at, rows.stop)} are in both {before.name} and {path.name}"
            raise ConfigError(f"{folder} is not one whole save: {what}; remove the folder and save again (every "
                              "rank writes its rows before one rank finishes).")
        at, before = rows.stop, path
        for name, (dtype, shape) in tensors.items():
            if kinds.setdefault(name, (dtype, shape[1:])) != (dtype, shape[1:]):
                raise ConfigError(f"{path} holds {name} as {dtype} rows of {shape[1:]}, another slice file as "
                                  f"{kinds[name][0]} rows of {kinds[name][1]}; remove the folder {folder} and save "
                                  "again.")
    if at != total:
        raise ConfigError(f"{folder} is not one whole save: rows {at}..{total} are in no slice file; remove the folder "
                          "and save again (every rank writes its rows before one rank finishes).")
    layout = {"format": FORMAT, "total": total,
              "tensors": {name: {"dtype": dtype, "shape": shape} for name, (dtype, shape) in kinds.items()},
              "files": [{"name": path.name, "start": rows.start, "stop": rows.stop, "bytes": path.stat().st_size}
                        for rows, path, _ in found]}
    return write_json(layout, folder / SLICES_JSON)


def read_layout(folder: str | Path) -> dict:
    """slices.json of a complete folder, checked: its files plain names that hold rows 0..total once each, each there
    with the size it was written with. One sentence where the folder is missing, incomplete (no slices.json: its
    save was cut short) or damaged."""
    folder = Path(folder)
    path = folder / SLICES_JSON
    if not folder.is_dir():
        raise ConfigError(f"the classifier folder {folder} does not exist; give the checkpoint it was saved with, "
                          "or the run directory that holds both.")
    if not path.is_file():
        raise ConfigError(f"{folder} has no {SLICES_JSON}: its save did not finish (a rank stopped before every rank "
                          "wrote its rows); resume from an earlier checkpoint.")
    try:
        layout = json.loads(path.read_text())
        if layout["format"] != FORMAT:
            raise ValueError(f"format {layout['format']!r}, not {FORMAT}")
        total, at = layout["total"], 0
        for entry in layout["files"]:
            if not is_plain_name(entry["name"]) or entry["name"] != slice_name(range(entry["start"], entry["stop"])):
                raise ValueError(f"file {str(entry['name'])[:80]!r}, not a slice file's name for its rows")
            if entry["start"] != at or entry["stop"] <= entry["start"] or not isinstance(entry["bytes"], int):
                raise ValueError(f"rows {entry['start']}..{entry['stop']} after row {at}")
            at = entry["stop"]
        if not isinstance(total, int) or at != total:
            raise ValueError(f"files ending at row {at} of {total}")
        for name, kind in layout["tensors"].items():
            if kind["dtype"] not in TORCH_DTYPES or not all(isinstance(n, int) and n >= 0 for n in kind["shape"]):
                raise ValueError(f"{name} as {kind['dtype']} rows of {kind['shape']}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # json's JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is damaged ({str(e)[:160]}); resume from an earlier checkpoint.") from None
    for entry in layout["files"]:  # every file, not only those this rank reads: every rank finds the same fault
        file = folder / entry["name"]
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise ConfigError(f"{file}, which {path} names, is missing: the folder was damaged after its save; "
                              "resume from an earlier checkpoint.") from None
        if size != entry["bytes"]:
            raise ConfigError(f"{file} has {size} bytes, {SLICES_JSON} says {entry['bytes']}: it was cut short or "
                              "replaced after its save; resume from an earlier checkpoint.")
    return layout


def read_rows(folder: str | Path, rows: range, total: int | None = None,
              names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Rows `rows` of every tensor in the complete `folder` (`names`: of those alone, e.g. the weights without their
    optimizer state), whatever world size wrote it, on the CPU: only the slice files that hold them are opened, and
    only those rows of them read. `total`: the rows this run expects (its number of classes), refused in one
    sentence if the folder holds another number.

    Rows from one file come back as safetensors gives them: a view of a private (copy-on-write) map of the file,
    whose pages are read when first touched; writing to them never changes the file. Rows from several files are
    copied into one new tensor. Copy them into the model (`param.copy_`) rather than keeping them."""
    folder = Path(folder)
    layout = read_layout(folder)
    if total is not None and total != layout["total"]:
        raise ConfigError(f"{folder} holds a classifier of {layout['total']} classes, this run has {total}; resume "
                          "with the classes it was trained with, or start from its weights instead.")
    _check_rows(rows, layout["total"])
    kinds = {name: (TORCH_DTYPES[kind["dtype"]], kind["shape"]) for name, kind in layout["tensors"].items()}
    if names is not None:
        names = list(names)
        if missing := [name for name in names if name not in kinds]:
            raise ConfigError(f"{folder} holds no {missing[0]} rows (it holds {sorted(kinds)}); give a folder of a "
                              "classifier saved with them.")
        wanted = {name: kinds[name] for name in names}
    else:
        wanted = kinds
    pieces = []  # (offset in the result, rows read, file) for each file that holds some of `rows`
    for entry in layout["files"]:
        start, stop = max(rows.start, entry["start"]), min(rows.stop, entry["stop"])
        if start < stop:
            pieces.append((start - rows.start, range(start, stop), entry))
    out = {}
    if len(pieces) != 1:  # the result put together from several files (or none): one buffer, no second copy
        out = {name: torch.empty((len(rows), *shape), dtype=dtype) for name, (dtype, shape) in wanted.items()}
    for offset, part, entry in pieces:
        path = folder / entry["name"]
        with _open(path) as f:
            file_rows, file_total, tensors = _describe_slice(path, f)
            expected = {name: (DTYPES[dtype], [len(file_rows), *shape]) for name, (dtype, shape) in kinds.items()}
            if (file_rows.start, file_rows.stop, file_total) != (entry["start"], entry["stop"], layout["total"]) or \
                    tensors != expected:
                raise ConfigError(f"{path} does not hold what {SLICES_JSON} says it holds (rows, tensors, dtypes or "
                                  "shapes): it was replaced after its save; resume from an earlier checkpoint.")
            lo, hi = part.start - file_rows.start, part.stop - file_rows.start
            for name in wanted:
                try:
                    rows_read = f.get_slice(name)[lo:hi]
                except (SafetensorError, OSError, ValueError) as e:
                    raise ConfigError(f"{path} cannot be read ({str(e)[:120]}): it is damaged; resume from an "
                                      "earlier checkpoint.") from None
                if len(pieces) == 1:
                    out[name] = rows_read
                else:
                    out[name][offset:offset + len(part)].copy_(rows_read)
                del rows_read
    return out


def remove(folder: str | Path) -> None:
    """Delete a folder this format wrote, complete or cut short: its slices.json first (it stops reading as
    complete), then its slice files and any temporary ones a killed writer left, then the folder. Refuses (one
    sentence, nothing deleted) a folder holding anything else."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise ConfigError(f"{folder} is not a classifier folder (not a folder, or a link); give the folder a "
                          "classifier save wrote.")
    entries = sorted(os.scandir(folder), key=lambda e: e.name != SLICES_JSON)  # slices.json first
    for entry in entries:
        ours = entry.name == SLICES_JSON or SLICE_NAME.fullmatch(entry.name) or TEMP_NAME.fullmatch(entry.name)
        if not ours or not entry.is_file(follow_symlinks=False):
            raise ConfigError(f"{folder} holds {entry.name}, which a classifier save does not write; nothing was "
                              "removed: move that file away, or give the right folder.")
    for entry in entries:
        os.unlink(entry.path)
        if entry.name == SLICES_JSON:
            fsync_dir(folder)  # the folder reads as incomplete before any slice file goes
    folder.rmdir()
    fsync_dir(folder.parent)
