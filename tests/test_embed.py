"""python -m recog.embed: two processes under torchrun embed every sample of the shards exactly once, as one
process does; a run stopped by SIGTERM and started again ends with the files of an uninterrupted run; bad input
is one sentence and exit code 2 on a 2-process run, which ends without hanging. The parts plan and the
batches' stream are tested without processes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLED, ROOT, recog_frames
from identify_setup import random_checkpoint

from recog.data.embed_stream import Part, PartStream, consecutive_runs, rank_parts, worker_parts
from recog.data.idx import find_idx_pair
from recog.data.manifest import item_key, load_manifest
from recog.data.plan import Piece, rank_pieces
from recog.data.stream import read_pieces
from recog.data.write import FASHION_MNIST_CLASSES, Record, idx_records, write_shards
from recog.embed import Plan, read_records
from recog.embeddings import open_embeddings
from recog.errors import ConfigError, DataError
from recog.export import export
from recog.exported import Preprocess
from recog.files import LOCK_FILE

# small batches and parts, so that a run has many of each (2 × 13 parts of the 1,000 tiny training images)
SETTINGS = ["batch_size=8", "part_size=40", "num_workers=1"]


def embed_cmd(nproc: int | None, *args) -> list[str]:
    torchrun = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, *torchrun, "-m", "recog.embed", *map(str, args)]


def embed_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_embed(nproc: int | None, *args, cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(embed_cmd(nproc, *args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=embed_env())


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_data) -> dict[str, Path]:
    """A checkpoint of the default job's config with random weights, and its export."""
    folder = tmp_path_factory.mktemp("embed-model")
    random_checkpoint(folder / "last.pt", f"data.train={tiny_data['train']}")
    export(folder / "last.pt", folder / "export", onnx=False)
    return {"checkpoint": folder / "last.pt", "export": folder / "export"}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_data, model) -> Path:
    """The uninterrupted 2-process run every other test compares with."""
    folder = tmp_path_factory.mktemp("embed-2")
    started = time.time()
    result = run_embed(2, f"model={model['export']}", f"data={tiny_data['train']}", f"out={folder / 'out'}",
                       *SETTINGS, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"2 processes: {time.time() - started:.1f} s; {result.stdout.strip().splitlines()[-1]}")
    return folder / "out"


def shard_keys(shards: Path) -> list[str]:
    """The gallery keys of every sample, in the shards' order: the folder's identity, then the sample's key."""
    manifest = load_manifest(shards)
    pieces = [Piece(i, 0, s.samples) for i, s in enumerate(manifest.shards)]
    return [item_key(manifest.identity, sample["__key__"])
            for sample in read_pieces(manifest, pieces, strict=True)]


def everything(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    emb = open_embeddings(folder)
    chunks = list(emb.chunks())
    return tuple(np.concatenate([getattr(c, name) for c in chunks]) for name in ("vectors", "keys", "labels"))


@pytest.mark.slow  # starts processes
def test_two_processes_embed_each_sample_once_as_one_process_does(two_processes, tiny_data, model, tmp_path):
    vectors, keys, labels = everything(two_processes)
    manifest, emb = load_manifest(tiny_data["train"]), open_embeddings(two_processes)
    assert list(keys) == shard_keys(tiny_data["train"])  # each sample once, in the shards' order
    assert emb.count == manifest.num_samples == 1000 and emb.dim == 128 and emb.classes == manifest.classes
    assert emb.sources == [{"identity": manifest.identity, "location": str(tiny_data["train"])}]
    assert sorted(p["name"] for p in emb.parts) == [p["name"] for p in emb.parts]  # rank 0's parts, then rank 1's
    assert {p["name"][:10] for p in emb.parts} == {"part-00000", "part-00001"} and len(emb.parts) == 26
    assert np.bincount(labels, minlength=10).tolist() == manifest.class_counts
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

    # one process, no torchrun, from the checkpoint rather than its export: the same vectors, the same model
    result = run_embed(None, f"model={model['checkpoint']}", f"data={tiny_data['train']}", f"out={tmp_path / 'one'}",
                       *SETTINGS, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    one_vectors, one_keys, one_labels = everything(tmp_path / "one")
    assert (one_keys == keys).all() and (one_labels == labels).all()
    error = np.abs(one_vectors - vectors).max()
    print(f"1 vs 2 processes: max difference {error:.2e}")
    assert error <= 1e-5
    assert open_embeddings(tmp_path / "one").model_sha256 == emb.model_sha256


def recog_traceback(stderr: str) -> bool:
    """Whether recog's processes printed a traceback (torchrun's own report aside)."""
    return bool(recog_frames(stderr))


def files(folder: Path) -> dict[str, bytes]:
    """Every file the embedder wrote (the lock file names its last holder's pid: not output)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK_FILE}


@pytest.mark.slow  # starts processes
def test_a_run_stopped_by_sigterm_continues_and_ends_with_the_same_files(two_processes, tiny_data, model, tmp_path):
    out = tmp_path / "out"
    args = [f"model={model['export']}", f"data={tiny_data['train']}", f"out={out}", *SETTINGS]
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(embed_cmd(2, *args), cwd=tmp_path, stdout=err, stderr=subprocess.STDOUT,
                                env=embed_env(), start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(list(out.glob("part-*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # to torchrun, as Kubernetes or scancel would: it passes it on
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = (tmp_path / "stderr").read_text()  # and stdout: rank 0 logs the line, as train.py's ranks do
    assert proc.returncode != 0 and "preempted: rank 0" in stderr and "exit code 75" in stderr, stderr[-3000:]
    assert not recog_traceback(stderr), stderr[-3000:]  # the one traceback is torchrun's, reporting its signal
    written = len(list(out.glob("part-*.json")))
    assert 2 <= written < 26 and not (out / "manifest.json").exists(), written

    again = run_embed(2, *args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"26 parts of up to 40 samples, {written} written already" in again.stdout, again.stdout
    assert files(out) == files(two_processes)  # every part, record and the manifest: byte for byte


@pytest.mark.slow  # the 2-process run
def test_parts_of_another_plan_are_refused_and_complete_parts_found(two_processes):
    """What a restarted rank reads from the out folder (in this process: the folder of the 2-process run)."""
    record = json.loads((two_processes / "part-00001-00003.json").read_text())
    plan, parts = Plan(**record["plan"]), rank_parts(500, 40)
    assert sorted(read_records(two_processes, plan, 1, parts)) == list(range(13))
    with pytest.raises(ConfigError, match=r"holds parts of another embedding run \(part_size 40 \(this run: 50\)\)"):
        read_records(two_processes, dataclasses.replace(plan, part_size=50), 1, rank_parts(500, 50))


def colour_shards(tiny_data, folder: Path) -> Path:
    """The tiny test shards, with a manifest saying they are colour images (the writer measures that)."""
    shutil.copytree(tiny_data["test"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["stats"]["channels"] = 3
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("case, message", [
    ("no export", "does not exist; give a folder written by python -m recog.export or a checkpoint"),
    ("no manifest", "no shard manifest at"),
    ("colour shards", "the model takes grey images (1 channel(s)) but the shards of"),
])
def test_bad_input_is_one_sentence_and_exit_code_2_on_every_rank(tiny_data, model, tmp_path, case, message):
    args = {"model": model["export"], "data": tiny_data["test"], "out": tmp_path / "out"}
    if case == "no export":
        args["model"] = tmp_path / "nowhere"
    elif case == "no manifest":
        args["data"] = tmp_path
    else:
        args["data"] = colour_shards(tiny_data, tmp_path / "colour")
    started = time.time()
    result = run_embed(2, *[f"{k}={v}" for k, v in args.items()], "num_workers=1", cwd=tmp_path, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # torchrun exits 1 and reports its workers' exit codes: every rank's is 2
    assert result.returncode == 1 and set(re.findall(r"exitcode\s+: (-?\d+)", result.stderr)) == {"2"}, \
        result.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert not recog_traceback(result.stderr), result.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # nothing written
    print(f"{case}: {time.time() - started:.1f} s")


@pytest.mark.slow  # starts processes
def test_an_undecodable_sample_is_skipped_or_with_strict_stops_the_whole_job(damaged_shards, model, tmp_path):
    """The damaged sample is in rank 0's slice: skipped and counted; with strict=true rank 0 stops with the
    sentence, and rank 1, done with its slice and waiting for rank 0, stops too instead of hanging."""
    args = [f"model={model['export']}", f"data={damaged_shards}", "num_workers=1", "part_size=4"]
    result = run_embed(2, *args, f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    emb = open_embeddings(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert emb.count == 19 and manifest["skipped"] == 1 and "skipping undecodable sample" in result.stdout
    assert "1 unreadable samples skipped" in result.stdout

    strict = run_embed(2, *args, f"out={tmp_path / 'strict'}", "strict=true", cwd=tmp_path, timeout=120)
    errors = [line for line in strict.stderr.splitlines() if line.startswith("error:")]
    assert strict.returncode == 1 and "exitcode  : 2" in strict.stderr, strict.stderr[-3000:]
    # rank 0's sentence; rank 1 (if it got there before torchrun stopped it) says that rank 0 went away
    decoding = [e for e in errors if "could not be decoded" in e and "set strict=false" in e]
    assert len(decoding) == 1 and all(e in decoding or "another rank went away" in e for e in errors), errors
    assert not (tmp_path / "strict" / "manifest.json").exists()


# --- without processes: the parts plan and the stream of one rank's batches ---

def test_parts_cover_a_ranks_samples_once_and_workers_take_contiguous_blocks():
    parts = rank_parts(101, 25)
    assert [(p.start, p.stop) for p in parts] == [(0, 25), (25, 50), (50, 75), (75, 100), (100, 101)]
    assert rank_parts(0, 25) == []
    blocks = [worker_parts(parts, w, 3) for w in range(3)]
    assert [p for block in blocks for p in block] == parts and all(blocks)
    assert [[p.number for p in run] for run in consecutive_runs([parts[0], parts[1], parts[3], parts[4]])] == \
           [[0, 1], [3, 4]]


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory) -> Path:
    """20 real images in shards of 8; the 6th sample's bytes are no image."""
    records, classes = idx_records(*find_idx_pair(BUNDLED, "test"), FASHION_MNIST_CLASSES)
    records = records[:20]
    records[5] = Record(records[5].label, "png", lambda: b"not a png", check=False)
    out = tmp_path_factory.mktemp("damaged") / "shards"
    write_shards(records, classes, out, prefix="bad", shard_samples=8, progress=False)
    return out


def stream(shards: Path, parts: list[Part], strict: bool = False) -> PartStream:
    manifest = load_manifest(shards)
    pieces = rank_pieces(manifest.shard_sizes, 0, 1, shuffle=False)
    return PartStream(manifest, pieces, parts, batch_size=4, preprocess=Preprocess(28), channels=1, strict=strict)


def test_an_undecodable_sample_is_skipped_and_counted_and_batches_stay_within_parts(damaged_shards):
    keys = [key.partition(":")[2] for key in shard_keys(damaged_shards)]  # batches carry the keys in their shards
    parts = rank_parts(20, 6)  # 6, 6, 6, 2: batches of 4, 2 per part (the last part: one of 2)
    batches = list(stream(damaged_shards, parts))
    assert [(b.part, len(b.keys) + b.skipped, b.last) for b in batches] == [
        (0, 4, False), (0, 2, True), (1, 4, False), (1, 2, True), (2, 4, False), (2, 2, True), (3, 2, True)]
    assert sum(b.skipped for b in batches) == 1 and batches[1].skipped == 1
    assert [k for b in batches for k in b.keys] == keys[:5] + keys[6:]
    assert batches[0].images.shape == (4, 1, 28, 28) and batches[0].images.dtype == torch.uint8

    # a restarted run reads only the parts still missing
    again = list(stream(damaged_shards, [parts[1], parts[3]]))
    assert [k for b in again for k in b.keys] == keys[6:12] + keys[18:]

    with pytest.raises(DataError, match="could not be decoded .* set strict=false"):
        list(stream(damaged_shards, parts, strict=True))
