"""Shard writing and streaming on real shards (written from the bundled Fashion-MNIST subset)."""

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLED, ROOT, tiny_split
from PIL import Image

from recog.data import offsets as offsets_module
from recog.data.__main__ import main as data_cli
from recog.data.decode import decode_image, plain_png
from recog.data.idx import find_idx_pair, read_idx
from recog.data.loader import Batch, loader_workers, make_loader
from recog.data.manifest import load_manifest
from recog.data.offsets import ShardOffsets
from recog.data.plan import Piece, mark_done
from recog.data.source import ShardSource
from recog.data.stream import ShardStream, fits_in_memory, read_pieces
from recog.data.write import folder_records, write_shards
from recog.errors import ConfigError, DataError


def test_auto_workers_share_the_cores_among_the_ranks():
    assert loader_workers("auto", local_world_size=2, cores=2) == 1  # this machine: 2 ranks on 2 cores
    assert loader_workers("auto", local_world_size=4, cores=2) == 1  # never none
    assert loader_workers("auto", local_world_size=8, cores=96) == 8  # a GPU node: capped
    assert loader_workers("auto", local_world_size=8, cores=48) == 6
    assert loader_workers(0, local_world_size=2, cores=2) == 0  # a number is kept, 0 too
    assert loader_workers(12, local_world_size=1, cores=2) == 12


def test_idx_round_trip_through_shards(tmp_path):
    images, labels = (read_idx(p) for p in find_idx_pair(BUNDLED, "test"))
    manifest = tiny_split(tmp_path / "s", "test", 250, 100)
    assert manifest.shard_sizes == [100, 100, 50] and manifest.num_samples == 250
    assert manifest.classes[0] == "T-shirt/top" and sum(manifest.class_counts) == 250
    assert manifest.class_counts == np.bincount(labels[:250], minlength=10).tolist()
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [s["samples"] for s in on_disk["shards"]] == [100, 100, 50]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in on_disk["shards"])

    samples = list(read_pieces(load_manifest(tmp_path / "s"), [Piece(1, 0, 100), Piece(2, 40, 50)], strict=True))
    assert len(samples) == 110
    for sample, i in zip(samples, list(range(100, 200)) + list(range(240, 250))):
        pixels = np.array(Image.open(io.BytesIO(sample["png"])))
        assert (pixels == images[i]).all() and int(sample["cls"]) == labels[i]


def test_folder_source_keeps_classes_and_bytes(tmp_path):
    for name, color in (("bag", 10), ("shoe", 200)):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 6), (color, i, 0)).save(tmp_path / "src" / name / f"{i}.jpg")
    (tmp_path / "src" / "shoe" / "notes.txt").write_text("not an image")
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(tmp_path / "out"), "--shard-samples", "4",
                     "--no-shuffle"]) == 0  # the folder's order: the first sample is bag/0.jpg
    manifest = load_manifest(tmp_path / "out")
    assert manifest.classes == ["bag", "shoe"] and manifest.class_counts == [3, 3] and manifest.shard_sizes == [4, 2]
    first = next(read_pieces(manifest, [Piece(0, 0, 1)], strict=True))
    assert first["jpg"] == (tmp_path / "src" / "bag" / "0.jpg").read_bytes()  # passed through unchanged
    # writing again into the same folder needs --overwrite
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert data_cli(["write", "folder", str(tmp_path / "src"), str(tmp_path / "out"), "--overwrite"]) == 0


def test_manifest_problems_are_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="no shard manifest"):
        load_manifest(tmp_path / "nowhere")
    tiny_split(tmp_path / "s", "test", 20, 10)
    (tmp_path / "s" / "test-000001.tar").unlink()
    with pytest.raises(ConfigError, match="missing"):
        load_manifest(tmp_path / "s")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text(json.dumps({"shards": [], "classes": [], "class_counts": []}))
    with pytest.raises(ConfigError, match="lists no samples"):
        load_manifest(tmp_path / "e")


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_gives_the_planned_batches(tiny_data, workers):
    manifest = load_manifest(tiny_data["train"])
    for rank in range(3):
        stream = ShardStream(manifest, rank=rank, world_size=3, batch_size=64, train=True, seed=1)
        batches = list(make_loader(stream, workers, pin_memory=False))
        assert len(batches) == len(stream) == 6  # ceil(ceil(1000 / 3) / 64)
        assert sorted(b.step for b in batches) == list(range(6))
        assert sum(len(b.labels) for b in batches) == (334 if rank == 0 else 333)  # each sample once
        assert batches[0].images.shape[1:] == (1, 28, 28) and batches[0].images.dtype == torch.uint8


def test_training_stream_is_reproducible_and_shuffled(tiny_data):
    manifest = load_manifest(tiny_data["train"])
    stream = ShardStream(manifest, rank=0, world_size=1, batch_size=50, seed=3, train=True)
    first = torch.cat([b.labels for b in stream])
    assert torch.equal(first, torch.cat([b.labels for b in stream]))
    stream.set_epoch(1)
    assert not torch.equal(first, torch.cat([b.labels for b in stream]))
    ordered = ShardStream(manifest, rank=0, world_size=1, batch_size=50, train=False)
    assert not torch.equal(first, torch.cat([b.labels for b in ordered]))
    assert torch.equal(first.sort().values, torch.cat([b.labels for b in ordered]).sort().values)


def corrupt_copy(src, dst, bad_keys):
    """Copy a shard, replacing the PNG bytes of `bad_keys` with garbage."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name.split(".")[0] in bad_keys and member.name.endswith(".png"):
                data = b"this is not a png" * 3
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))


def test_undecodable_sample_is_skipped_and_counted(tmp_path, caplog):
    manifest = tiny_split(tmp_path / "s", "test", 40, 20)
    shard = tmp_path / "s" / "test-000000.tar"
    corrupt_copy(shard, tmp_path / "bad.tar", {"000000003", "000000011"})
    (tmp_path / "bad.tar").replace(shard)
    stream = ShardStream(manifest, rank=0, world_size=1, batch_size=16, train=False)
    with caplog.at_level(logging.WARNING):
        batches = list(stream)
    assert [len(b.labels) for b in batches] == [14, 16, 8] and sum(b.skipped for b in batches) == 2
    assert "undecodable" in caplog.text and "000000003" in caplog.text
    with pytest.raises(DataError, match="could not be decoded"):
        list(ShardStream(manifest, rank=0, world_size=1, batch_size=16, train=False, strict=True))


def test_kept_decoded_epochs_equal_read_ones_without_reading_the_shards(tmp_path, caplog):
    """keep_decoded (small data sets): from the second epoch on, the same batches (images, labels, skipped
    counts) come from memory; the shards are not read, even when they are gone."""
    import shutil

    manifest = tiny_split(tmp_path / "s", "train", 200, 64)
    shard = tmp_path / "s" / "train-000001.tar"
    corrupt_copy(shard, tmp_path / "bad.tar", {"000000070"})
    (tmp_path / "bad.tar").replace(shard)
    assert fits_in_memory(manifest, 1) and not fits_in_memory(manifest, 0.1)  # 200 x 784 bytes: 0.15 MB

    def epochs(stream, remove_shards_after_first):
        for epoch in range(3):
            stream.set_epoch(epoch)
            yield list(stream)
            if remove_shards_after_first and epoch == 0:  # only a stream that kept every image can go on
                shutil.move(tmp_path / "s", tmp_path / "gone")

    kw = dict(rank=0, world_size=1, batch_size=32, seed=5, train=True, transform=lambda x: x.flip(-1))
    read = list(epochs(ShardStream(manifest, **kw), False))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kept = list(epochs(ShardStream(manifest, keep_decoded=True, **kw), True))
    assert caplog.text.count("skipping undecodable sample") == 1 and "read failed" not in caplog.text
    for a, b in zip(read, kept, strict=True):
        assert [x.skipped for x in a] == [x.skipped for x in b] and sum(x.skipped for x in a) == 1
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert not torch.equal(torch.cat([x.labels for x in kept[0]]), torch.cat([x.labels for x in kept[1]]))


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    manifest = tiny_split(tmp_path / "s", "test", 40, 20)
    shard = tmp_path / "s" / "test-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 25 * 1024])  # the first few of its 20 samples survive
    batches = list(ShardStream(manifest, rank=0, world_size=1, batch_size=16, train=False))
    assert len(batches) == 3  # the batch count does not change: equal steps on every rank
    skipped = sum(b.skipped for b in batches)
    assert 5 <= skipped < 20 and sum(len(b.labels) for b in batches) == 40 - skipped
    with pytest.raises(DataError):
        list(ShardStream(manifest, rank=0, world_size=1, batch_size=16, train=False, strict=True))


@pytest.mark.parametrize("chunk", [16 << 20, 3000, 1])  # one read per piece, a few samples per read, one each
@pytest.mark.parametrize("on_its_own", [32 << 10, 400, 1])  # no image read on its own (28 px PNGs), some, all
def test_shards_read_by_their_index_give_what_the_tar_headers_give(tiny_data, monkeypatch, chunk, on_its_own,
                                                                    caplog):
    monkeypatch.setattr(offsets_module, "CHUNK", chunk)
    monkeypatch.setattr(offsets_module, "ON_ITS_OWN", on_its_own)
    manifest = load_manifest(tiny_data["train"])
    offsets = ShardOffsets.load(manifest, ShardSource())
    pieces = [Piece(0, 0, 384), Piece(1, 100, 300), Piece(2, 231, 232), Piece(1, 0, 1)]
    with caplog.at_level(logging.WARNING):
        indexed = list(read_pieces(manifest, pieces, True, offsets=offsets))
    assert indexed == list(read_pieces(manifest, pieces, strict=True)) and len(indexed) == 586
    assert not caplog.text and all(offsets.of(s) for s in range(3))  # no shard fell back to its tar headers


def test_a_shard_rewritten_after_its_index_is_read_through_its_tar_headers(tmp_path, caplog):
    """PAX headers (as another tar tool may write) move every member: the headers at the indexed offsets no
    longer match, the shard is read through its tar headers with one warning, and nothing is lost."""
    manifest = tiny_split(tmp_path / "s", "test", 60, 30)
    expected = list(read_pieces(manifest, [Piece(0, 0, 30), Piece(1, 0, 30)], strict=True))
    shard = tmp_path / "s" / "test-000001.tar"
    with tarfile.open(shard) as tin, tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin.getmembers():
            member.pax_headers = {"comment": "rewritten"}
            tout.addfile(member, tin.extractfile(member))
    (tmp_path / "pax.tar").replace(shard)
    offsets = ShardOffsets.load(manifest, ShardSource())
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # the second pass goes straight to the tar headers
            samples = list(read_pieces(manifest, [Piece(0, 0, 30), Piece(1, 0, 30)], True, offsets=offsets))
            assert [s["__key__"] for s in samples] == [s["__key__"] for s in expected]
            assert [s["png"] for s in samples] == [s["png"] for s in expected]
    assert caplog.text.count("does not match its index") == 1 and "test-000001.tar" in caplog.text
    assert offsets.of(0) and offsets.of(1) is None


def test_shards_without_an_index_are_read_through_their_tar_headers(tmp_path, caplog):
    tiny_split(tmp_path / "s", "test", 40, 20)
    raw = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**raw, "index": ""}))  # as other tools write them
    manifest = load_manifest(tmp_path / "s")
    offsets = ShardOffsets.load(manifest, ShardSource())
    with caplog.at_level(logging.WARNING):
        samples = list(read_pieces(manifest, [Piece(0, 0, 20), Piece(1, 3, 9)], True, offsets=offsets))
    assert offsets.of(0) is None and not caplog.text and len(samples) == 26 and all(s["png"] for s in samples)


@pytest.mark.parametrize("on_its_own", [32 << 10, 1])
def test_a_truncated_shard_read_by_its_index_keeps_the_samples_before_the_cut(tmp_path, monkeypatch, on_its_own):
    monkeypatch.setattr(offsets_module, "ON_ITS_OWN", on_its_own)
    manifest = tiny_split(tmp_path / "s", "test", 40, 20)
    whole = list(read_pieces(manifest, [Piece(1, 0, 20)], strict=True))
    shard = tmp_path / "s" / "test-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 25 * 1024])
    offsets = ShardOffsets.load(manifest, ShardSource())
    indexed = list(read_pieces(manifest, [Piece(1, 0, 20)], False, offsets=offsets))
    by_tar = list(read_pieces(manifest, [Piece(1, 0, 20)], strict=False))
    kept = [s for s in indexed if s is not None]
    assert len(indexed) == 20 and 5 <= len(kept) < 20 and kept == whole[:len(kept)]
    assert len(kept) == len([s for s in by_tar if s and "png" in s])  # what the tar path keeps whole
    with pytest.raises(DataError, match="could not be read"):
        list(read_pieces(manifest, [Piece(1, 0, 20)], True, offsets=offsets))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_png_decoding_gives_what_pil_gives(mode, channels):
    """8-bit grey and RGB PNGs go through TorchCodec's decoder (faster), the rest through PIL: the pixels are
    PIL's either way (16-bit ones their high byte: tests/test_decode.py), and a damaged PNG raises."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 29, 3), dtype=np.uint8))
    if mode == "I;16":  # the whole 16-bit range: × 257
        image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    else:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format="PNG")
    data = out.getvalue()
    with Image.open(io.BytesIO(data)) as pil:
        if mode == "I;16":
            pil = Image.fromarray((np.asarray(pil) >> 8).astype(np.uint8))
        expected = np.array(pil.convert("L" if channels == 1 else "RGB"))
    decoded = decode_image(data, channels)
    assert decoded.dtype == torch.uint8 and decoded.shape == (channels, 37, 29)
    assert np.array_equal(decoded.permute(1, 2, 0).squeeze(-1).numpy(), expected)
    assert plain_png(data, channels) == ((mode, channels) in (("L", 1), ("RGB", 3)))  # TorchCodec is installed
    with pytest.raises((OSError, RuntimeError)):  # PIL's "image file is truncated", libpng's error
        decode_image(data[: len(data) // 2], channels)


def test_writer_refuses_nothing_to_write(tmp_path):
    with pytest.raises(ConfigError, match="no samples"):
        write_shards([], ["a"], tmp_path / "x")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        folder_records(tmp_path)


def test_class_names_from_a_preset_a_string_or_a_config_list():
    from omegaconf import OmegaConf

    from recog.data.prepare import parse_class_names
    from recog.data.write import FASHION_MNIST_CLASSES

    assert parse_class_names(None) is None and parse_class_names("fashion_mnist") == FASHION_MNIST_CLASSES
    assert parse_class_names("bag, shoe") == ["bag", "shoe"] and parse_class_names(["a,b", "c"]) == ["a,b", "c"]
    prepare = OmegaConf.create({"class_names": ["bag", "shoe"]})  # data.prepare.class_names as a YAML list
    assert parse_class_names(prepare.get("class_names")) == ["bag", "shoe"]


def test_persistent_workers_follow_set_epoch(tiny_data):
    """Workers live for the whole run (separate processes); each epoch they must read that epoch's plan."""
    manifest = load_manifest(tiny_data["train"])
    in_process = ShardStream(manifest, rank=1, world_size=2, batch_size=64, seed=5)
    with_worker = ShardStream(manifest, rank=1, world_size=2, batch_size=64, seed=5)
    loader = make_loader(with_worker, num_workers=1, pin_memory=False)
    for epoch in range(3):
        in_process.set_epoch(epoch)
        with_worker.set_epoch(epoch)
        expected = torch.cat([b.labels for b in in_process])
        assert torch.equal(torch.cat([b.labels for b in loader]), expected)


def test_list_file_parallel_writers_shard_mb_and_reencoding(tmp_path):
    (tmp_path / "img").mkdir()
    lines = ["# path<TAB>label"]
    for i in range(30):
        Image.new("RGB", (32, 32), (i * 8, 100, 50)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png\t{'shoe' if i % 3 else 'bag'}")
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    one = tmp_path / "one"
    assert data_cli(["write", "list", str(tmp_path / "list.tsv"), str(one), "--shard-samples", "7"]) == 0
    many = tmp_path / "many"
    assert data_cli(["write", "list", str(tmp_path / "list.tsv"), str(many), "--shard-samples", "7",
                     "--workers", "3"]) == 0
    a, b = load_manifest(one), load_manifest(many)
    assert a.classes == ["bag", "shoe"] and a.class_counts == [10, 20] and a.shard_sizes == [7, 7, 7, 7, 2]
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # parallel writing: the same bytes

    by_size = tmp_path / "mb"
    sizes = [p.stat().st_size + 1024 for p in (tmp_path / "img").iterdir()]  # image + tar headers
    limit_mb = 10.5 * sum(sizes) / len(sizes) / 1e6  # about 10 samples per shard
    assert data_cli(["write", "list", str(tmp_path / "list.tsv"), str(by_size), "--shard-mb", str(limit_mb)]) == 0
    assert sum(load_manifest(by_size).shard_sizes) == 30 and len(load_manifest(by_size).shards) == 3

    jpg = tmp_path / "jpg"
    assert data_cli(["write", "list", str(tmp_path / "list.tsv"), str(jpg), "--reencode", "jpg"]) == 0
    sample = next(read_pieces(load_manifest(jpg), [Piece(0, 0, 1)], strict=True))
    assert "jpg" in sample and sample["jpg"][:2] == b"\xff\xd8"  # a JPEG now


def test_list_file_errors_name_the_line(tmp_path):
    (tmp_path / "list.tsv").write_text("missing.jpg\t0\n")
    with pytest.raises(ConfigError, match="list.tsv:1: .*missing.jpg is not"):
        from recog.data.write import list_records

        list_records(tmp_path / "list.tsv")


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/recog-unpickled-marker", "w"))  # would create a file if ever unpickled


def test_shard_contents_are_never_unpickled(tmp_path):
    import pickle

    import webdataset as wds

    marker = Path("/tmp/recog-unpickled-marker")
    marker.unlink(missing_ok=True)
    png = io.BytesIO()
    Image.new("L", (8, 8), 7).save(png, format="PNG")
    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "x-000000.tar"), encoder=False) as tar:
        tar.write({"__key__": "a", "png": png.getvalue(), "cls": b"0", "pyd": pickle.dumps(_Boom())})
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(
        {"shards": [{"name": "x-000000.tar", "samples": 1}], "classes": ["a"], "class_counts": [1]}))
    batches = list(ShardStream(load_manifest(tmp_path / "s"), rank=0, world_size=1, batch_size=4, train=False))
    assert len(batches[0].labels) == 1 and not marker.exists()


@pytest.mark.parametrize("crop_while_decoding", [False, True])
def test_corrupted_jpeg_is_skipped_and_counted(tmp_path, crop_while_decoding):
    from torchvision.transforms import v2

    from recog.data.decode import CropWhileDecoding

    for i in range(6):
        (tmp_path / "src" / "c").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (40 * i, 20, 90)).save(tmp_path / "src" / "c" / f"{i}.jpg", quality=90)
    good = (tmp_path / "src" / "c" / "2.jpg").read_bytes()
    (tmp_path / "src" / "c" / "2.jpg").write_bytes(good[: len(good) // 2])  # cut off mid-scan
    (tmp_path / "src" / "c" / "4.jpg").write_bytes(good[:20] + b"\x00" * 50)  # header, then garbage
    # The writer checks images and would leave these two out (tests/test_write_safety.py); shards written by
    # other tools may hold such images, so write them unchecked here: training skips and counts them.
    from recog.data.write import Record, write_shards

    records = [Record(0, "jpg", p.read_bytes, check=False) for p in sorted((tmp_path / "src" / "c").iterdir())]
    write_shards(records, ["c"], tmp_path / "out", progress=False)
    decode = CropWhileDecoding(v2.RandomResizedCrop(8)) if crop_while_decoding else None
    batches = list(ShardStream(load_manifest(tmp_path / "out"), rank=0, world_size=1, batch_size=4, channels=3,
                               train=False, decode=decode))
    assert [len(b.labels) for b in batches] == [3, 1] and sum(b.skipped for b in batches) == 2
    assert batches[0].images.shape[-2:] == ((8, 8) if crop_while_decoding else (24, 24))


def test_random_access_reads_the_same_samples_as_the_stream(tiny_data):
    from recog.data.random_access import ShardRandomAccess

    manifest = load_manifest(tiny_data["train"])
    data = ShardRandomAccess(manifest)
    assert len(data) == 1000 and data.labels.tolist() == [int(s["cls"]) for s in read_pieces(
        manifest, [Piece(i, 0, n) for i, n in enumerate(manifest.shard_sizes)], strict=True)]
    streamed = next(iter(ShardStream(manifest, rank=0, world_size=1, batch_size=1000, train=False)))
    for i in (0, 383, 384, 999):
        image, label = data[i]
        assert torch.equal(image, streamed.images[i]) and label == streamed.labels[i]
    subset = ShardRandomAccess(load_manifest(f"{tiny_data['train']}/train-{{000002..000002}}.tar"))
    assert len(subset) == 232 and torch.equal(subset[0][0], streamed.images[768])


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_reads_exactly_the_samples_not_yet_seen(tiny_data, workers):
    """Rank 1 of 2, epoch 1, with augmentation: stop after 5 steps, resume from the steps done."""
    from torchvision.transforms import v2

    manifest = load_manifest(tiny_data["train"])

    def stream():  # a shuffle block of 100 samples (rounded to 128), so that resuming starts inside a block
        return ShardStream(manifest, rank=1, world_size=2, batch_size=32, train=True, seed=4, shuffle_block=100,
                           transform=v2.RandomHorizontalFlip())

    whole = stream()
    whole.set_epoch(1)
    uninterrupted = list(make_loader(whole, workers, pin_memory=False))
    seen, done = uninterrupted[:5], []
    for batch in seen:
        done = mark_done(done, batch.step)
    resumed_stream = stream()
    resumed_stream.set_epoch(1, done)
    resumed = list(make_loader(resumed_stream, workers, pin_memory=False))

    # counted: the seen and the resumed steps hold exactly the rank's 500 samples of the epoch
    assert sum(len(b.labels) for b in seen) + sum(len(b.labels) for b in resumed) == 500
    assert len(seen) + len(resumed) == len(whole) == 16
    # and they are the very batches the uninterrupted epoch had, augmentation included, in its order
    assert [b.step for b in resumed] == [b.step for b in uninterrupted[5:]]
    for got, want in zip(resumed, uninterrupted[5:]):
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    # the augmentation did flip images (so the equality above is not trivially true)
    plain = ShardStream(manifest, rank=1, world_size=2, batch_size=32, train=True, seed=4, shuffle_block=100)
    plain.set_epoch(1)
    unflipped = list(make_loader(plain, workers, pin_memory=False))
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(uninterrupted, unflipped))
    assert sum(not torch.equal(a.images, b.images) for a, b in zip(uninterrupted, unflipped)) == 16


def global_steps(manifest, world, micro_batches, done=(), **kw) -> dict[int, Batch]:
    """Every step of epoch 2 not in `done`, as the ranks of `world` make it: the ranks' batches joined in rank
    order (= the micro-batches in order)."""
    from torchvision.transforms import v2

    per_rank = []
    for rank in range(world):
        stream = ShardStream(manifest, rank=rank, world_size=world, batch_size=16, train=True, seed=9,
                             micro_batches=micro_batches, shuffle_block=40, transform=v2.RandomHorizontalFlip(), **kw)
        stream.set_epoch(2, done)
        per_rank.append({b.step: b for b in make_loader(stream, 0, pin_memory=False)})
    assert len({tuple(steps) for steps in per_rank}) == 1  # every rank makes the same steps, in the same order
    return {step: Batch(torch.cat([r[step].images for r in per_rank]), torch.cat([r[step].labels for r in per_rank]),
                        0) for step in per_rank[0]}


@pytest.mark.parametrize("before, after", [(4, 1), (2, 3), (1, 4), (3, 2)])
def test_a_new_world_size_mid_epoch_continues_with_the_same_global_batches(tiny_data, before, after):
    """4 micro-batches of 16 (global batch 64) on `before` ranks for 5 steps, the rest on `after` ranks: the steps are
    those of the epoch on 4 ranks, image for image (augmentation included); none is made twice or left out."""
    manifest = load_manifest(tiny_data["train"])
    reference = global_steps(manifest, 4, 4)
    assert len(reference) == 16 and sum(len(b.labels) for b in reference.values()) == 1000
    first = dict(list(global_steps(manifest, before, 4).items())[:5])
    done = []
    for step in first:
        done = mark_done(done, step)
    rest = global_steps(manifest, after, 4, done)
    assert sorted([*first, *rest]) == list(range(16))
    for step, batch in [*first.items(), *rest.items()]:
        assert torch.equal(batch.images, reference[step].images) and torch.equal(batch.labels, reference[step].labels)


def test_mid_epoch_resume_of_pk_batches_through_the_loader(tiny_data):
    from torchvision.transforms import v2

    from recog.data.random_access import ShardRandomAccess, collate
    from recog.data.sampler import DistributedBatchSampler

    data = ShardRandomAccess(load_manifest(tiny_data["train"]), transform=v2.RandomHorizontalFlip())

    def batches(done=(), rank=0, world=2):
        sampler = DistributedBatchSampler(data.labels, 4, 8, rank=rank, world_size=world, seed=2, micro_batches=2)
        sampler.set_epoch(3, done)
        return list(make_loader(data, 2, False, batch_sampler=sampler, collate_fn=collate))

    uninterrupted = batches()
    resumed = batches([[0, 6]])
    assert len(uninterrupted) == 15 and len(resumed) == 9  # 1000 // (2 × 4 × 8) steps
    for got, want in zip(resumed, uninterrupted[6:]):
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    # the same steps on one rank: both micro-batches, one after the other, are what the two ranks had
    alone = batches([[0, 6]], world=1)
    other = batches([[0, 6]], rank=1)
    for mine, first, second in zip(alone, resumed, other):
        assert mine.sizes == (32, 32) and mine.step == first.step == second.step
        assert torch.equal(mine.images, torch.cat([first.images, second.images]))


def test_the_data_layer_imports_nothing_of_torch_distributed():
    """recog.data is pure data logic: none of its modules pulls in recog.dist (or the modules built on it)."""
    import subprocess
    import sys

    modules = sorted(f"recog.data.{p.stem}" for p in (ROOT / "recog" / "data").glob("*.py") if p.stem != "__main__")
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('recog') and not m.startswith('recog.data')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    # preempt: stdlib signal only; files: atomic writes and the folder lock, stdlib only
    assert result.stdout.strip() == "['recog', 'recog.errors', 'recog.files', 'recog.preempt']"


def test_a_data_loader_worker_imports_train_py_without_the_model():
    """Each worker imports the main script again (as __mp_main__, see loader.worker_context): train.py must leave
    the model, TensorBoard and the training loop to main(), or every worker spends seconds importing them."""
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "runpy.run_path('train.py', run_name='__mp_main__')\n"
            "print(sorted(m for m in ('recog.train', 'recog.model', 'torch.utils.tensorboard') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
