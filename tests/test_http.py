"""Shards over HTTP from a real server on 127.0.0.1: node cache, retries, sha256, failures."""

import json
import logging
import multiprocessing
import shutil

import pytest
import torch
from conftest import run_train, tiny_args
from http_server import CountingServer

from recog.data.manifest import load_manifest
from recog.data.offsets import ShardOffsets
from recog.data.plan import Piece
from recog.data.source import FetchError, ShardSource
from recog.data.stream import ShardStream, read_pieces
from recog.errors import ConfigError, DataError


@pytest.fixture
def server(tiny_data):
    srv = CountingServer(tiny_data["train"].parent)
    yield srv
    srv.stop()


PIECES = [Piece(0, 0, 384), Piece(1, 100, 300), Piece(2, 5, 6)]  # whole and partial pieces


def fast(cache_dir=None, retries=2):
    return ShardSource(cache_dir=str(cache_dir) if cache_dir else None, retries=retries, backoff_s=0.05, timeout_s=5)


def read_all(manifest, source, epochs=1, **kw):
    stream = ShardStream(manifest, rank=0, world_size=1, batch_size=64, train=False, source=source, **kw)
    out = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        out.append(list(stream))
    return out


def test_cache_turns_later_epochs_into_local_reads(server, tmp_path):
    streamed = load_manifest(f"{server.url}/train", fast())
    assert streamed.num_samples == 1000 and streamed.url(0).startswith("http://127.0.0.1")
    without_cache = read_all(streamed, fast(), epochs=2)
    assert set(server.shard_requests().values()) == {2}  # no cache: every epoch goes to the server
    server.counts.clear()
    with_cache = read_all(streamed, fast(tmp_path / "cache"), epochs=2)
    assert set(server.shard_requests().values()) == {1}  # cached: the second epoch reads the node's disk
    for a, b in zip(without_cache[1], with_cache[1]):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("on_its_own", [32 << 10, 400])  # 28 px PNGs: all in chunks, or some read on their own
def test_shards_over_http_are_read_by_their_index(server, tiny_data, tmp_path, cached, on_its_own, monkeypatch,
                                                  caplog):
    """Streamed or node-cached, the shards are read by the offsets of their index (fetched once per process)
    and give what reading the local shards through their tar headers gives."""
    from recog.data import offsets as offsets_module

    monkeypatch.setattr(offsets_module, "ON_ITS_OWN", on_its_own)
    local = read_pieces(load_manifest(tiny_data["train"]), PIECES, strict=True)
    manifest = load_manifest(f"{server.url}/train", fast())
    offsets = ShardOffsets.load(manifest, fast())
    assert server.counts["/train/index.npz"] == 1 and all(offsets.of(s) for s in range(len(manifest.shards)))
    source = fast(tmp_path / "cache" if cached else None)
    with caplog.at_level(logging.WARNING):
        assert list(read_pieces(manifest, PIECES, True, source, offsets)) == [
            {**s, "__url__": s["__url__"].replace(str(tiny_data["train"]), f"{server.url}/train")} for s in local]
    assert not caplog.text and all(offsets.of(s) for s in range(len(manifest.shards)))


def test_an_index_the_server_does_not_have_leaves_the_tar_path(tiny_data, tmp_path, caplog):
    shutil.copytree(tiny_data["train"], tmp_path / "site" / "train")
    (tmp_path / "site" / "train" / "index.npz").unlink()
    srv = CountingServer(tmp_path / "site")
    try:
        manifest = load_manifest(f"{srv.url}/train", fast())
        with caplog.at_level(logging.WARNING):
            offsets = ShardOffsets.load(manifest, fast())
            samples = list(read_pieces(manifest, PIECES, True, fast(), offsets))
        assert "could not be read" in caplog.text and "tar headers" in caplog.text
        assert srv.counts["/train/index.npz"] == 2  # one retry, not the shards' four: the tar path still works
    finally:
        srv.stop()
    local = list(read_pieces(load_manifest(tiny_data["train"]), PIECES, strict=True))
    assert [s["png"] for s in samples] == [s["png"] for s in local] and len(samples) == len(local)


def _fetch(args):
    url, sha, cache = args
    return str(fast(cache).cached(url, sha))


def test_processes_on_one_node_download_a_shard_once(server, tmp_path):
    manifest = load_manifest(f"{server.url}/train", fast())
    server.delay_s = 0.3  # every process asks while the first download is still running
    with multiprocessing.get_context("fork").Pool(4) as pool:
        paths = pool.map(_fetch, [(manifest.url(0), manifest.shards[0].sha256, tmp_path / "cache")] * 4)
    assert len(set(paths)) == 1 and server.shard_requests() == {"/train/train-000000.tar": 1}


def test_errors_are_retried_with_backoff(server, tmp_path, caplog):
    manifest = load_manifest(f"{server.url}/train", fast())
    server.fail_next("/train/train-000001.tar", 500, times=2)
    with caplog.at_level(logging.WARNING):
        batches = read_all(manifest, fast(tmp_path / "cache"))[0]
    assert sum(len(b.labels) for b in batches) == 1000 and sum(b.skipped for b in batches) == 0
    assert server.counts["/train/train-000001.tar"] == 3 and "try 1 of 3" in caplog.text


@pytest.mark.parametrize("status", [404, 500])
def test_a_server_that_keeps_failing_stops_with_the_url(server, tmp_path, status):
    manifest = load_manifest(f"{server.url}/train", fast())
    server.fail_next("/train/train-000002.tar", status)
    with pytest.raises(FetchError, match=r"could not fetch http://127.0.0.1:\d+/train/train-000002.tar after 3 tries"):
        read_all(manifest, fast(tmp_path / "cache"))
    assert server.counts["/train/train-000002.tar"] == 3


def test_server_going_down_mid_epoch_stops_with_a_clear_error(server, tmp_path):
    manifest = load_manifest(f"{server.url}/train", fast())
    server.stop_after = 3  # the manifest, the shards' index and one shard, then the server is gone
    with pytest.raises(FetchError, match=r"could not fetch http://127.0.0.1:\d+/train/train-00000[12].tar"):
        read_all(manifest, fast(tmp_path / "cache"))


def test_sha256_mismatch_is_skipped_and_counted_or_stops_when_strict(tiny_data, tmp_path, caplog):
    shutil.copytree(tiny_data["train"], tmp_path / "site" / "train")
    path = tmp_path / "site" / "train" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["shards"][1]["sha256"] = "0" * 64  # the shard on the server no longer matches its manifest
    path.write_text(json.dumps(raw))
    srv = CountingServer(tmp_path / "site")
    try:
        manifest = load_manifest(f"{srv.url}/train", fast())
        with caplog.at_level(logging.WARNING):
            batches = read_all(manifest, fast(tmp_path / "cache"))[0]
        assert sum(b.skipped for b in batches) == 384  # the whole damaged shard, counted
        assert sum(len(b.labels) for b in batches) == 1000 - 384 and "sha256" in caplog.text
        assert not list((tmp_path / "cache").glob("0000000000000000-*.tar"))  # never cached
        with pytest.raises(DataError, match="sha256"):
            read_all(manifest, fast(tmp_path / "cache"), strict=True)
    finally:
        srv.stop()


def test_a_damaged_cached_shard_is_fetched_again(server, tmp_path):
    manifest = load_manifest(f"{server.url}/train", fast())
    source = fast(tmp_path / "cache")
    path = source.cached(manifest.url(0), manifest.shards[0].sha256)
    path.write_bytes(path.read_bytes()[:1000])  # e.g. a disk error, or someone editing the cache
    from recog.data import source as source_module

    source_module._VERIFIED.clear()  # as in a new process
    assert source.cached(manifest.url(0), manifest.shards[0].sha256).stat().st_size == manifest.shards[0].bytes
    assert server.counts["/train/train-000000.tar"] == 2


def test_only_allowed_schemes(tiny_data):
    with pytest.raises(ConfigError, match="uses scheme 'pipe', which is not allowed"):
        load_manifest("pipe:cat /etc/passwd")
    with pytest.raises(ConfigError, match="scheme 's3'"):
        fast().open("s3://bucket/shard.tar")


def test_brace_pattern_selects_shards(server, tiny_data):
    local = load_manifest(f"{tiny_data['train']}/train-{{000000..000001}}.tar")
    assert local.shard_sizes == [384, 384]
    remote = load_manifest(f"{server.url}/train/train-{{000002,000001}}.tar", fast())
    assert remote.shard_sizes == [232, 384] and remote.url(0) == f"{server.url}/train/train-000002.tar"
    with pytest.raises(ConfigError, match="train-000003.tar .* is not in the manifest"):
        load_manifest(f"{tiny_data['train']}/train-{{000002..000003}}.tar")


@pytest.mark.slow
def test_training_over_http_fetches_each_shard_once_per_node(server, tiny_data, tmp_path):
    result = run_train(tiny_args(tiny_data, epochs=2, **{
        "data.train": f"{server.url}/train", "data.test": f"{server.url}/test", "data.cache_dir": tmp_path / "cache",
    }) + [f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["eval_samples"] == 301 and metrics["skipped_samples"] == 0
    # 2 ranks x (1 worker + the main process) x 2 epochs of train and test reads: each shard crossed the network once
    assert server.shard_requests() == {f"/train/train-00000{i}.tar": 1 for i in range(3)} | {
        f"/test/test-00000{i}.tar": 1 for i in range(3)}
