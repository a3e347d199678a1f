"""A sharded classifier's files: written by W ranks, read back re-sliced by W' ranks, refused in one sentence when
incomplete, overlapping, damaged or cut short, and read a part at a time. No process group: each rank's write is
a call with its rank's rows."""

import gc
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recog import classifier_files as cf
from recog.errors import ConfigError
from recog.sharded import class_slice

NAMES = ("weight", "exp_avg", "exp_avg_sq")


def classifier(total: int, dim: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A classifier's rows and their AdamW state, every row different (a row read from the wrong place differs)."""
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(total, dim, generator=g), "exp_avg": torch.randn(total, dim, generator=g),
            "exp_avg_sq": torch.rand(total, dim, generator=g).to(torch.bfloat16)}


def save(folder: Path, tensors: dict[str, torch.Tensor], world_size: int, finish: bool = True) -> Path:
    """What W ranks do at a checkpoint: each writes its rows, then (after the barrier) one finishes."""
    total = len(next(iter(tensors.values())))
    for rank in range(world_size):
        rows = class_slice(rank, world_size, total)
        cf.write_slice(folder, {name: t[rows.start:rows.stop] for name, t in tensors.items()}, rows, total)
    if finish:
        cf.finish(folder, total, tensors)
    return folder


def refused(call, *words: str) -> str:
    """The one sentence `call` is refused with, which names each of `words` (the file, the fix)."""
    with pytest.raises(ConfigError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.endswith("."), message
    for word in words:
        assert str(word) in message, (word, message)
    return message


def test_a_rank_outside_the_world_has_no_rows():
    with pytest.raises(ValueError):
        class_slice(2, 2, 10)


def test_the_weights_alone_are_read_when_asked(tmp_path):
    """weights= reads the rows without their optimizer state (recog.imprint): from one file, and across two."""
    tensors = classifier(10)
    folder = save(tmp_path / "c", tensors, 2)
    for rows in (range(1, 4), range(3, 8)):
        got = cf.read_rows(folder, rows, total=10, names=["weight"])
        assert list(got) == ["weight"] and torch.equal(got["weight"], tensors["weight"][rows.start:rows.stop])
    refused(lambda: cf.read_rows(folder, range(0, 2), names=["momentum_buffer"]), folder, "momentum_buffer")


def test_any_world_size_reads_what_any_world_size_wrote(tmp_path):
    for total in (3, 10, 13):  # 3 < 4 ranks: a rank with no rows writes no file
        tensors = classifier(total, seed=total)
        for writers in (1, 2, 3, 4):
            folder = save(tmp_path / f"{total}-{writers}", tensors, writers)
            assert len(list(folder.glob("rows-*.safetensors"))) == min(writers, total)
            for readers in (1, 2, 3, 4):
                for rank in range(readers):
                    rows = class_slice(rank, readers, total)
                    got = cf.read_rows(folder, rows, total=total)
                    assert set(got) == set(NAMES)
                    for name in NAMES:
                        assert got[name].dtype == tensors[name].dtype
                        assert torch.equal(got[name], tensors[name][rows.start:rows.stop]), (writers, readers, rank)


def test_a_slice_file_is_plain_safetensors(tmp_path):
    tensors = classifier(10)
    save(tmp_path / "c", tensors, 3)
    path = tmp_path / "c" / "rows-0000000004-0000000007.safetensors"
    loaded = load_file(path)  # safetensors' own reader
    assert all(torch.equal(loaded[name], tensors[name][4:7]) for name in NAMES)
    layout = json.loads((tmp_path / "c" / "slices.json").read_text())
    assert layout["total"] == 10 and [f["name"] for f in layout["files"]][1] == path.name
    assert layout["tensors"]["exp_avg_sq"] == {"dtype": "BF16", "shape": [3]}


def test_a_folder_whose_save_did_not_finish_is_refused(tmp_path):
    tensors = classifier(10)
    folder = save(tmp_path / "c", tensors, 2, finish=False)
    refused(lambda: cf.read_rows(folder, range(0, 5)), folder, "slices.json", "earlier checkpoint")
    refused(lambda: cf.read_rows(tmp_path / "none", range(0, 5)), tmp_path / "none", "does not exist")
    # one rank's file missing: finish refuses, so slices.json never marks the folder complete
    missing = tmp_path / "m"
    save(missing, tensors, 3, finish=False)
    (missing / "rows-0000000007-0000000010.safetensors").unlink()
    refused(lambda: cf.finish(missing, 10, NAMES), missing, "rows 7..10 are in no slice file", "save again")
    assert not (missing / "slices.json").exists()
    # a file gone after a finished save: refused by every rank, also one that reads none of its rows
    gone = save(tmp_path / "g", tensors, 2)
    (gone / "rows-0000000005-0000000010.safetensors").unlink()
    refused(lambda: cf.read_rows(gone, range(0, 5)), "rows-0000000005-0000000010.safetensors", "missing")


def test_overlapping_or_gapped_files_are_refused(tmp_path):
    tensors = classifier(10)
    both = tmp_path / "both"  # two saves of different world sizes into one folder
    save(both, tensors, 2, finish=False)
    save(both, tensors, 3, finish=False)
    refused(lambda: cf.finish(both, 10, NAMES), both, "remove the folder",
            "rows 0..4 are in both rows-0000000000-0000000004.safetensors and rows-0000000000-0000000005.safetensors")
    gap = tmp_path / "gap"
    save(gap, tensors, 3, finish=False)
    (gap / "rows-0000000004-0000000007.safetensors").unlink()
    refused(lambda: cf.finish(gap, 10, NAMES), gap, "rows 4..7 are in no slice file")
    other = tmp_path / "other"  # a file left by a save of another number of classes
    save(other, classifier(12), 2, finish=False)
    refused(lambda: cf.finish(other, 10, NAMES), "rows-0000000000-0000000006.safetensors", "12-row classifier")
    refused(lambda: cf.finish(other, 12, ["weight"]), "rows-0000000000-0000000006.safetensors",
            "not ['weight']")
    # slices.json itself saying rows overlap (edited by hand) is refused too
    edited = save(tmp_path / "edited", tensors, 2)
    layout = json.loads((edited / "slices.json").read_text())
    layout["files"][1]["start"] = 4
    (edited / "slices.json").write_text(json.dumps(layout))
    refused(lambda: cf.read_rows(edited, range(0, 10)), edited / "slices.json", "damaged")


def test_a_run_with_another_number_of_classes_is_refused(tmp_path):
    folder = save(tmp_path / "c", classifier(10), 2)
    refused(lambda: cf.read_rows(folder, range(0, 5), total=11), "10 classes", "this run has 11")


def test_damaged_files_are_refused_in_one_sentence(tmp_path):
    tensors = classifier(10)
    name = "rows-0000000005-0000000010.safetensors"
    for damage in ("cut short", "header", "length", "metadata", "names", "slices.json"):
        folder = save(tmp_path / damage.replace(" ", "-"), tensors, 2)
        path = folder / name
        data = bytearray(path.read_bytes())
        if damage == "cut short":
            path.write_bytes(data[:-10])
            refused(lambda f=folder: cf.read_rows(f, range(5, 10)), name, "cut short")
            refused(lambda f=folder: cf.read_rows(f, range(0, 5)), name, "cut short")  # found by every rank
            continue
        if damage == "header":  # the same size, its JSON garbled
            data[8:40] = b"\xff" * 32
        elif damage == "length":  # a header length past the file's end
            data[0:8] = (len(data) * 10).to_bytes(8, "little")
        elif damage == "metadata":  # valid safetensors, but other rows than its name and slices.json say
            data = data.replace(b'"start":"5"', b'"start":"4"')
        elif damage == "names":  # its metadata names another tensor than it holds
            data = data.replace(b'\\"weight\\"]', b'\\"weighX\\"]')
        if damage == "slices.json":
            (folder / "slices.json").write_text('{"format": "recog-classifier-rows/1", "total": ')
            refused(lambda f=folder: cf.read_rows(f, range(5, 10)), folder / "slices.json", "damaged")
            continue
        path.write_bytes(data)
        refused(lambda f=folder: cf.read_rows(f, range(5, 10)), path, "earlier checkpoint")
        refused(lambda f=folder: cf.finish(f, 10, NAMES), path)
    # A rank that reads none of a damaged file's rows opens only its own file (headers of every file on every rank
    # would cost W x W' opens); the caller wraps read_rows in dist.fail_together so that every rank stops.
    assert torch.equal(cf.read_rows(tmp_path / "header", range(0, 5))["weight"], tensors["weight"][:5])


def test_a_slice_file_is_never_replaced(tmp_path, monkeypatch):
    tensors = classifier(10)
    folder = save(tmp_path / "c", tensors, 2, finish=False)
    before = (folder / "rows-0000000000-0000000005.safetensors").read_bytes()
    refused(lambda: cf.write_slice(folder, {n: t[:5] * 2 for n, t in tensors.items()}, range(0, 5), 10),
            "rows-0000000000-0000000005.safetensors", "already exists", "remove the folder")
    assert (folder / "rows-0000000000-0000000005.safetensors").read_bytes() == before
    cf.finish(folder, 10, NAMES)
    refused(lambda: cf.write_slice(folder, {n: t[:3] for n, t in tensors.items()}, range(0, 3), 10),
            "slices.json", "already exists")
    # another writer's file appearing under the name while this one writes (two saves into one folder) is kept
    other = tmp_path / "other" / "rows-0000000000-0000000005.safetensors"
    write_tensor = cf._write_tensor

    def another_writer_meanwhile(f, tensor):
        if not other.exists():
            other.write_bytes(b"the other writer's")
        write_tensor(f, tensor)

    monkeypatch.setattr(cf, "_write_tensor", another_writer_meanwhile)
    refused(lambda: cf.write_slice(other.parent, {n: t[:5] for n, t in tensors.items()}, range(0, 5), 10),
            other, "another writer")
    assert other.read_bytes() == b"the other writer's" and [p.name for p in other.parent.iterdir()] == [other.name]
    with pytest.raises(ValueError):  # a tensor that is not the rows it is given for: the caller's mistake
        cf.write_slice(tmp_path / "d", {"weight": torch.zeros(4, 3)}, range(0, 5), 10)


def test_a_killed_write_leaves_no_complete_folder(tmp_path):
    """A rank killed (SIGKILL: no finally runs) between two tensors of its file leaves a temporary file only: no
    slice file under its name, so the folder is refused, finish refuses it, and remove clears it."""
    tensors = classifier(10)
    folder = tmp_path / "c"
    save(folder, {n: t for n, t in tensors.items()}, 2, finish=False)
    (folder / "rows-0000000005-0000000010.safetensors").unlink()  # rank 1 writes again, and is killed
    pid = os.fork()
    if pid == 0:  # the killed rank
        try:
            write_tensor = cf._write_tensor

            def write_then_die(f, tensor):
                write_tensor(f, tensor)
                os.kill(os.getpid(), signal.SIGKILL)

            cf._write_tensor = write_then_die
            cf.write_slice(folder, {n: t[5:] for n, t in tensors.items()}, range(5, 10), 10)
        finally:
            os._exit(3)  # never reached when the kill came
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = sorted(p.name for p in folder.iterdir())
    assert left == [f".rows-0000000005-0000000010.safetensors.tmp-{pid}", "rows-0000000000-0000000005.safetensors"]
    refused(lambda: cf.read_rows(folder, range(0, 5)), "slices.json")
    refused(lambda: cf.finish(folder, 10, NAMES), "rows 5..10 are in no slice file")
    cf.remove(folder)
    assert not folder.exists()


def test_remove_deletes_only_folders_this_format_wrote(tmp_path):
    folder = save(tmp_path / "c", classifier(10), 3)
    cf.remove(folder)
    assert not folder.exists()
    cut_short = save(tmp_path / "cut", classifier(10), 3, finish=False)
    (cut_short / ".rows-0000000000-0000000004.safetensors.tmp-99").write_bytes(b"half")
    cf.remove(cut_short)
    assert not cut_short.exists()
    mixed = save(tmp_path / "mixed", classifier(10), 2)
    (mixed / "notes.txt").write_text("mine")
    refused(lambda: cf.remove(mixed), mixed, "notes.txt", "nothing was removed")
    assert sorted(p.name for p in mixed.iterdir()) == ["notes.txt", "rows-0000000000-0000000005.safetensors",
                                                       "rows-0000000005-0000000010.safetensors", "slices.json"]
    refused(lambda: cf.remove(mixed / "slices.json"), "not a classifier folder")


def _memory() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def _peak_of(call) -> int:
    """The most this process's resident memory grew (anonymous and mapped file pages) while `call` ran."""
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = _memory()["VmRSS"]
    call()
    return _memory()["VmHWM"] - before


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_a_rank_reads_only_its_rows(tmp_path):
    """One writer's 100 MB file read by the first of 4 ranks: the process grows by about a quarter of the file (its
    rows, touched), not by the file. The whole file read the same way grows it by all of it: the gauge can see it."""
    total, dim = 32_768, 256
    rows_of_file = torch.arange(total * dim, dtype=torch.float32).reshape(total, dim)
    save(tmp_path / "c", {name: rows_of_file + i for i, name in enumerate(NAMES[:2])} |
         {"exp_avg_sq": rows_of_file.to(torch.bfloat16)}, 1)
    size = (tmp_path / "c" / "rows-0000000000-0000032768.safetensors").stat().st_size
    assert size > 80e6
    expected = rows_of_file[8192:8200].clone()
    del rows_of_file
    gc.collect()

    def read_and_touch(rows):
        got = cf.read_rows(tmp_path / "c", rows)
        assert all(float(t.sum()) != 0 for t in got.values())  # every byte of every row read
        assert torch.equal(got["weight"][8192 - rows.start:8200 - rows.start], expected)

    quarter = _peak_of(lambda: read_and_touch(class_slice(1, 4, total)))
    whole = _peak_of(lambda: read_and_touch(range(total)))
    assert quarter < 0.4 * size, (quarter, size)
    assert whole > 0.9 * size, (whole, size)
