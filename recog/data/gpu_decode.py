"""data.decode=gpu: the training images decoded and augmented on the training GPU, not in the loader workers.

The workers only read the shards: each training batch travels as its images' encoded bytes (`EncodedImages`), and
the training process decodes it on its GPU with TorchCodec (nvJPEG, the whole batch in one call), then augments it
there (`decode_batch`), before the loop sees it (`DecodeOnDevice`). The workers' CPU then no longer caps the
images/s of a GPU that trains faster than they decode (bench/gpu_session.sh, part 5, measures both).

JPEGs are decoded on the device. Any other image (PNG, WebP), a JPEG with an EXIF orientation other than 1 (nvJPEG
decodes it as stored; `decode_image` turns it upright), and a JPEG the device's decoder refuses (CMYK, say), is
decoded on the CPU in the training process as a worker would decode it (`decode_image`), then moved to the
device: a folder of mixed formats trains as with data.decode=cpu, its non-JPEGs only slower (a warning says so
once). An image that cannot be decoded at all is skipped and counted, or stops the run under data.strict=true.

The augmentation is the preset's, run image by image on the device (torchvision's v2 ops take CUDA tensors), with
torch's RNG seeded as the worker would seed it for that batch: the same crops and flips as data.decode=cpu, and a
resumed epoch gets the same images. On the CPU (device="cpu", what the tests run), TorchCodec decodes as PIL does
and the batches are data.decode=cpu's to the bit (with data.jpeg_scaled_decode=false); on a GPU, nvJPEG's decoding
and a resize in float (torchvision resizes uint8 on CUDA through float32) differ from them by a level or so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from recog.data.decode import decode_image, jpeg_orientation
from recog.data.loader import Batch, join_batches
from recog.errors import DataError

try:  # TorchCodec: PyTorch's image decoders (torchvision's are deprecated in its favour)
    from torchcodec.decoders import decode_jpeg
except (ImportError, OSError):  # not installed, or built for another torch: data.decode=gpu is refused (config.py)
    decode_jpeg = None

log = logging.getLogger(__name__)

GPU_DECODE_AVAILABLE = decode_jpeg is not None
JPEG_SIGNATURE = b"\xff\xd8\xff"  # SOI marker, then the next marker's first byte


class EncodedImages(NamedTuple):
    """A training batch's images as the shards store them (data.decode=gpu): what a worker hands over in
    `Batch.images` instead of pixels. One tensor for all the bytes rather than one per image: each tensor
    travels from the worker through a shared-memory file of its own."""

    data: torch.Tensor  # uint8 (sum of sizes,): every image's encoded bytes, one after the other
    sizes: torch.Tensor  # int64 (n,): each image's length in bytes
    seed: int  # torch's seed for this batch's augmentation: the one the worker would have augmented it with
    names: tuple[str, ...] = ()  # where each image came from (shard url:key), for the message about a bad one

    @classmethod
    def pack(cls, encoded: list[bytes], seed: int, names: tuple[str, ...] = ()) -> EncodedImages:
        joined = b"".join(encoded)
        data = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        return cls(data, torch.tensor([len(e) for e in encoded], dtype=torch.int64), seed, names)

    def unpack(self) -> list[torch.Tensor]:
        """Each image's bytes: 1-D uint8 views of `data` (on the CPU, where TorchCodec wants them)."""
        return list(torch.split(self.data, self.sizes.tolist()))


def keep_encoded(data: bytes, channels: int) -> bytes:
    """The workers' `Decode` under data.decode=gpu: no decoding, the bytes as they are."""
    return data


def is_jpeg(data: torch.Tensor) -> bool:
    return data[:3].numpy().tobytes() == JPEG_SIGNATURE


def for_the_device(data: torch.Tensor) -> bool:
    """A JPEG the device decodes as decode_image would: one stored upright (no EXIF orientation other than 1; its
    header is read, not its pixels)."""
    return is_jpeg(data) and jpeg_orientation(data.numpy()) == 1


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device, channels: int) -> list[torch.Tensor | None]:
    """JPEGs -> uint8 C×H×W on `device`, in one call; None for one the decoder there refuses."""
    mode = "GRAY" if channels == 1 else "RGB"
    try:
        return decode_jpeg(encoded, mode=mode, device=device)
    except RuntimeError:  # one of them is damaged, or of a kind nvJPEG does not decode: each on its own
        decoded = []
        for data in encoded:
            try:
                decoded.append(decode_jpeg(data, mode=mode, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def decode_batch(encoded: list[torch.Tensor], labels: torch.Tensor, device: torch.device | str,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 channels: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    """Encoded images (1-D uint8 tensors on the CPU) and their labels -> (the decoded images after `transform`,
    uint8 N×C×H×W on `device`; their labels; the positions of those that could not be decoded, left out, and why).

    Upright JPEGs are decoded on `device` in one call, the others (and JPEGs refused there) on the CPU and then moved to
    `device`. `transform` runs on each image in turn, drawing from torch's RNG in the order the CPU path draws:
    seeded alike, the same crops. No image left: an empty tensor (0,)."""
    device = torch.device(device)
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if for_the_device(data)]
    if jpegs:
        for i, image in zip(jpegs, decode_jpegs([encoded[i] for i in jpegs], device, channels), strict=True):
            images[i] = image
    failed = {}
    for i, image in enumerate(images):
        if image is None:  # not an upright JPEG, or refused: as a worker decodes it (PIL, or TorchCodec for plain PNGs)
            try:
                images[i] = decode_image(encoded[i].numpy().tobytes(), channels).to(device)
            except Exception as e:  # anything a worker's decoding would skip (stream.py)
                failed[i] = str(e)
    kept = [i for i, image in enumerate(images) if image is not None]
    augmented = [transform(images[i]) if transform else images[i] for i in kept]
    stacked = torch.stack(augmented) if augmented else torch.empty(0, dtype=torch.uint8, device=device)
    return stacked, labels[kept], failed


class DecodeOnDevice:
    """In the training process (data.decode=gpu): a training batch as the workers hand it over (EncodedImages)
    -> the same batch with its images decoded and augmented on `device`, the Batch data.decode=cpu gives.
    Images that cannot be decoded are left out and counted in `skipped` (each named in the batch's warnings),
    or, with `strict`, stop the run."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device,
                 channels: int, strict: bool = False):
        self.transform, self.device, self.channels, self.strict = transform, device, channels, strict
        self.shape: tuple[int, ...] | None = None  # of the last batch's images, for a batch left empty
        self.told_not_jpeg = False

    def __call__(self, batch: Batch) -> Batch:
        if isinstance(batch.images, EncodedImages):
            return self.decode_micro_batch(batch)
        # several micro-batches of one step (recog.data.plan): each decoded with its own seed, then joined again
        micro_batches = [self.decode_micro_batch(Batch(images, labels, 0)) for images, labels in
                         zip(batch.images, batch.labels.split(list(batch.sizes)))]
        joined = join_batches(micro_batches)
        return batch._replace(images=joined.images, labels=joined.labels, skipped=batch.skipped + joined.skipped,
                              sizes=joined.sizes,
                              warnings=(*batch.warnings, *(w for m in micro_batches for w in m.warnings)))

    def decode_micro_batch(self, batch: Batch) -> Batch:
        encoded: EncodedImages = batch.images
        encoded_images = encoded.unpack()
        if not self.told_not_jpeg and not all(is_jpeg(data) for data in encoded_images):
            self.told_not_jpeg = True
            log.warning("data.decode=gpu: some training images are not JPEGs (PNG, WebP); the training process "
                        "decodes those on its CPU, one at a time (data.decode=cpu decodes them in the loader workers)")
        with torch.random.fork_rng(devices=[]):  # the training process's own RNG is left as it was
            torch.manual_seed(encoded.seed)
            images, labels, failed = decode_batch(encoded_images, batch.labels, self.device, self.transform,
                                                  self.channels)
        bad = [(encoded.names[i] if encoded.names else f"#{i} of a batch", why) for i, why in failed.items()]
        if bad and self.strict:
            raise DataError(f"sample {bad[0][0]} could not be decoded ({bad[0][1]}); fix it or set data.strict=false.")
        if len(labels):
            self.shape = tuple(images.shape[1:])
        elif self.shape:  # every image unreadable: a batch of none, shaped as the others
            images = images.new_empty((0, *self.shape))
        return batch._replace(images=images, labels=labels, skipped=batch.skipped + len(failed),
                              warnings=(*batch.warnings, *(f"skipping undecodable sample {name} ({why})"
                                                           for name, why in bad)))
