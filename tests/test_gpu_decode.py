"""data.decode=gpu on the CPU: the batch decode + augment (`decode_batch`) with device="cpu" against the CPU path's
pixels, and train.py's data built with data.decode=gpu on a CPU device against data.decode=cpu, batch for batch.
The CUDA path is the same code with device="cuda" (bench/gpu_session.sh, part 5, runs it on a GPU); here,
without CUDA, data.decode=gpu is one sentence and exit code 2."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from conftest import run_train, tiny_args
from PIL import Image
from torchvision.transforms import v2

from recog.build import build_data
from recog.data.decode import decode_image
from recog.data.gpu_decode import DecodeOnDevice, EncodedImages, decode_batch
from recog.data.loader import Batch
from recog.data.write import Record, write_shards
from recog.dist import Dist
from recog.errors import DataError
from recog.rundir import compose_train_config
from recog.testing import photo_like_jpeg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = [(64, 48), (48, 64), (80, 60), (56, 56), (100, 75)]  # width, height: a batch of mixed sizes, as photos are
# Mean absolute difference from the CPU path, in levels of 255. On the CPU TorchCodec and PIL decode alike (0 here);
# the bound leaves room for another libjpeg build. nvJPEG on a GPU is further off (bench/gpu_session.sh, part 5).
MEAN_DIFFERENCE = 1.0
ONE_PROCESS_ON_CPU = Dist(0, 0, 1, 1, torch.device("cpu"), None)


def png(rng: np.random.Generator, width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def jpegs(count: int, seed: int = 0, grey_every: int = 4) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [photo_like_jpeg(rng, *SIZES[i % len(SIZES)], grey=i % grey_every == grey_every - 1)
            for i in range(count)]


def as_tensors(encoded: list[bytes]) -> list[torch.Tensor]:
    return EncodedImages.pack(encoded, seed=0).unpack()


def cpu_path(encoded: list[bytes], transform, channels: int = 3) -> torch.Tensor:
    """What a loader worker does with data.decode=cpu: decode (PIL), then the transform, image by image."""
    return torch.stack([transform(decode_image(data, channels)) for data in encoded])


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().float().mean().item()


def test_encoded_images_travel_as_one_tensor_and_come_back_as_they_were():
    encoded = jpegs(3) + [b"", png(np.random.default_rng(0), 8, 8)]
    packed = EncodedImages.pack(encoded, seed=7, names=("a", "b", "c", "d", "e"))
    assert packed.data.dtype == torch.uint8 and packed.data.dim() == 1 and packed.sizes.tolist() == list(
        map(len, encoded))
    assert [bytes(part.numpy()) for part in packed.unpack()] == encoded and packed.seed == 7
    assert EncodedImages.pack([], seed=0).unpack() == []


@pytest.mark.parametrize("channels", [3, 1])
def test_decode_batch_on_cpu_gives_the_cpu_paths_pixels_for_a_fixed_transform(channels):
    encoded = jpegs(10)
    transform = v2.Compose([v2.Resize(40, antialias=True), v2.CenterCrop(40)])
    labels = torch.arange(10)
    images, kept_labels, failed = decode_batch(as_tensors(encoded), labels, "cpu", transform, channels)
    expected = cpu_path(encoded, transform, channels)
    assert images.shape == expected.shape == (10, channels, 40, 40) and images.dtype == expected.dtype == torch.uint8
    assert images.device.type == "cpu" and torch.equal(kept_labels, labels) and failed == {}
    assert mean_difference(images, expected) <= MEAN_DIFFERENCE


def test_decode_batch_draws_the_cpu_paths_random_crops_and_flips_when_seeded_alike():
    encoded = jpegs(12)
    transform = v2.Compose([v2.RandomResizedCrop(32, antialias=True), v2.RandomHorizontalFlip()])
    torch.manual_seed(5)
    images, _, _ = decode_batch(as_tensors(encoded), torch.zeros(12), torch.device("cpu"), transform)
    after = torch.rand(1)
    torch.manual_seed(5)
    expected = cpu_path(encoded, transform)
    assert torch.rand(1) == after  # the same number of draws
    assert images.shape == expected.shape == (12, 3, 32, 32)
    assert mean_difference(images, expected) <= MEAN_DIFFERENCE
    torch.manual_seed(6)  # another seed: other crops (the comparison above is not trivially true)
    assert mean_difference(decode_batch(as_tensors(encoded), torch.zeros(12), "cpu", transform)[0], expected) > 10


def test_decode_batch_decodes_other_formats_on_the_cpu_and_leaves_out_what_cannot_be_decoded():
    rng = np.random.default_rng(1)
    good = jpegs(2)
    picture = png(rng, 30, 20)
    encoded = [good[0], picture, good[1][:200], b"\xff\xd8\xff not a jpeg", b"neither", good[1]]
    fit = v2.Compose([v2.Resize(16, antialias=True), v2.CenterCrop(16)])
    images, labels, failed = decode_batch(as_tensors(encoded), torch.arange(6) * 10, "cpu", fit)
    assert list(failed) == [2, 3, 4] and labels.tolist() == [0, 10, 50] and images.shape == (3, 3, 16, 16)
    assert torch.equal(images[1], fit(decode_image(picture, 3)))  # the PNG: the workers' own decoding
    assert mean_difference(images[[0, 2]], cpu_path([good[0], good[1]], fit)) <= MEAN_DIFFERENCE
    nothing, no_labels, failed = decode_batch(as_tensors([b"bad"]), torch.tensor([3]), "cpu", fit)
    assert nothing.shape == (0,) and len(no_labels) == 0 and list(failed) == [0]


def test_decode_on_device_counts_names_and_strictly_refuses_an_undecodable_image(caplog):
    encoded = jpegs(3)
    encoded[1] = encoded[1][:150]
    names = ("s.tar:a", "s.tar:b", "s.tar:c")
    batch = Batch(EncodedImages.pack(encoded, seed=3, names=names), torch.tensor([0, 1, 2]), skipped=1,
                  warnings=("from the worker",))
    fit = v2.Compose([v2.Resize(24, antialias=True), v2.CenterCrop(24)])
    rng_before = torch.get_rng_state()
    decoded = DecodeOnDevice(fit, torch.device("cpu"), channels=3)(batch)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training process's RNG is left alone
    assert decoded.images.shape == (2, 3, 24, 24) and decoded.labels.tolist() == [0, 2] and decoded.skipped == 2
    assert decoded.warnings[0] == "from the worker" and len(decoded.warnings) == 2
    assert decoded.warnings[1].startswith("skipping undecodable sample s.tar:b (")  # and why: PIL's error
    with pytest.raises(DataError, match=r"^sample s.tar:b could not be decoded \(.+\); fix it or set "
                                        r"data.strict=false.$"):
        DecodeOnDevice(fit, torch.device("cpu"), channels=3, strict=True)(batch)
    on_device = DecodeOnDevice(fit, torch.device("cpu"), channels=3)
    with caplog.at_level(logging.WARNING, logger="recog"):
        on_device(batch._replace(images=EncodedImages.pack([png(np.random.default_rng(0), 9, 9)] * 3, seed=0)))
        on_device(batch._replace(images=EncodedImages.pack([png(np.random.default_rng(0), 9, 9)] * 3, seed=0)))
        empty = on_device(batch._replace(images=EncodedImages.pack([b"x"] * 3, seed=0)))
    assert sum("not JPEGs" in r.getMessage() for r in caplog.records) == 1  # said once
    assert empty.images.shape == (0, 3, 24, 24) and empty.skipped == 4  # none left: shaped as the batch before


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """Photo-like JPEGs of mixed sizes (a quarter grey), two PNGs and a damaged JPEG, in 3 training shards; a test
    split of 12 JPEGs."""
    root = tmp_path_factory.mktemp("jpeg-shards")
    train = [Record(i % 4, "jpg", (lambda b=b: b), len(b)) for i, b in enumerate(jpegs(45))]
    rng = np.random.default_rng(2)
    pngs = [png(rng, 70, 50), png(rng, 50, 70)]
    train += [Record(1 + i, "png", (lambda b=b: b), len(b)) for i, b in enumerate(pngs)]
    damaged = jpegs(1, seed=9)[0][:300]
    train.append(Record(3, "jpg", lambda: damaged, check=False))
    classes = [f"class{c}" for c in range(4)]
    write_shards(train, classes, root / "train", shard_samples=20, shuffle=True, progress=False)
    test = [Record(i % 4, "jpg", (lambda b=b: b), len(b)) for i, b in enumerate(jpegs(12, seed=3))]
    write_shards(test, classes, root / "test", shard_samples=20, progress=False)
    return root


def composed(shards, *overrides: str):
    return compose_train_config("data=images", f"data.train={shards / 'train'}", f"data.test={shards / 'test'}",
                                "data.channels=3", "data.image_size=32", "augment=imagenet",
                                "data.jpeg_scaled_decode=false", "batch_size=8", *overrides)


def epoch_batches(cfg, epochs: int = 1) -> list[Batch]:
    """The training batches train.py's loop would get, on the CPU (check_config, which refuses data.decode=gpu
    without CUDA, is not called: this is the GPU path's code with device=cpu)."""
    data = build_data(cfg, ONE_PROCESS_ON_CPU)
    position, batches = data.start(), []
    for _ in range(epochs):
        batches += list(data.batches(position))
        position.next_epoch()
    return batches


@pytest.mark.parametrize("overrides", [
    ["data.num_workers=0"],  # two epochs: the second from the encoded bytes kept in memory
    ["data.num_workers=1", "data.keep_decoded_mb=0"],  # EncodedImages through a worker process
    ["data.num_workers=0", "sampler=pk", "sampler.p=2", "sampler.k=3"],
    ["data.num_workers=1", "data.keep_decoded_mb=0", "global_batch=24"],  # 3 micro-batches a step, decoded one by one
    ["data.num_workers=0", "sampler=pk", "sampler.p=2", "sampler.k=3", "global_batch=12"],
], ids=["stream", "stream-worker", "pk", "stream-3-micro-batches", "pk-2-micro-batches"])
def test_gpu_decode_on_a_cpu_device_gives_the_batches_of_cpu_decode(jpeg_shards, overrides):
    epochs = 2 if overrides == ["data.num_workers=0"] else 1
    torch.manual_seed(0)
    on_device = epoch_batches(composed(jpeg_shards, "data.decode=gpu", *overrides), epochs)
    rng_after = torch.get_rng_state()
    torch.manual_seed(0)
    in_workers = epoch_batches(composed(jpeg_shards, *overrides), epochs)
    assert torch.equal(torch.get_rng_state(), rng_after)  # decoding here drew nothing from the training loop's RNG
    assert len(on_device) == len(in_workers) > 0
    for gpu, cpu in zip(on_device, in_workers, strict=True):
        assert torch.equal(gpu.labels, cpu.labels) and gpu.skipped == cpu.skipped and gpu.worker == cpu.worker
        assert tuple(gpu.sizes) == tuple(cpu.sizes) and len(gpu.sizes) == (3 if "global_batch=24" in overrides else
                                                             2 if "global_batch=12" in overrides else 0)
        assert gpu.images.shape == cpu.images.shape and gpu.images.dtype == torch.uint8
        assert mean_difference(gpu.images, cpu.images) <= MEAN_DIFFERENCE
    if not any(o.startswith("sampler") for o in overrides):  # a stream epoch: every sample once (one damaged)
        assert sum(len(b.labels) for b in on_device) == 47 * epochs
        assert sum(b.skipped for b in on_device) == epochs
        assert any("skipping undecodable sample" in w for b in on_device for w in b.warnings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: data.decode=gpu trains here")
def test_gpu_decode_without_a_gpu_stops_train_py_with_one_sentence(tiny_data, tmp_path):
    result = run_train(tiny_args(tiny_data) + ["data.decode=gpu"], cwd=tmp_path, nproc=None, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and errors == [
        "error: data.decode=gpu needs a CUDA GPU, which this machine lacks; use data.decode=cpu."], result.stderr
    assert "Traceback" not in result.stderr
