"""Encoded image bytes -> uint8 tensors, in the data-loader workers.

`decode_image` decodes the whole image (PIL, or TorchCodec for a plain PNG), and is the one place that decides
what an image's pixels are: 16-bit images keep their high byte (v >> 8, as PIL reads 16-bit colour PNGs), and
an image with an EXIF orientation is turned upright (as a phone or a browser shows it). Every other decoding path
(`CropWhileDecoding`, data.decode=gpu, the shard writer's check, re-encoding and statistics, identify, serve)
either calls it or hands it the images it would not decode the same way.

With data.jpeg_scaled_decode (on by default), a training transform that starts with a RandomResizedCrop has
that crop done while decoding (`CropWhileDecoding`): the crop torchvision would draw is drawn, and the JPEG
decoded by libjpeg-turbo (simplejpeg) at 1/8, 1/4 or 1/2 of its size where the crop still covers the output
there. 1.3-1.9x the images/s per core; reduced crops differ from full decoding by about one level of 255
(bench/decode.py, docs/data.md).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as transforms_v1
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from recog.errors import DataError

try:
    import simplejpeg
except ImportError:  # a base dependency; without it data.jpeg_scaled_decode=auto decodes with PIL, as false does
    simplejpeg = None

try:  # TorchCodec: PyTorch's image and video decoders (torchvision's decoders are deprecated in its favour)
    from torchcodec.decoders import decode_png
except (ImportError, OSError):  # not installed, or built for another torch: PIL decodes every image
    decode_png = None

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PIL's modes of a grey image
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # grey images of more than 8 bits (16-bit PNGs)
ORIENTATION = 0x0112  # the EXIF tag: how the stored pixels are to be turned to be upright (1: as stored)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}  # orientation -> the turn that makes the image upright (as ImageOps does)


def plain_png(data: bytes, channels: int) -> bool:
    """An 8-bit PNG already in the wanted colour type (grey for 1 channel, RGB for 3), with no EXIF (`eXIf`
    chunk: it may turn the image): nothing to convert. TorchCodec (libpng) decodes those to PIL's pixels in less
    than half the time (~25 against ~80 µs for a 28×28 grey image here, most of PIL's being per-image Python).
    Every other image goes through PIL."""
    return (decode_png is not None and data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 26
            and data[24] == 8 and data[25] == (0 if channels == 1 else 2) and not png_has_exif(data))


def png_has_exif(data: bytes) -> bool:
    """Whether a PNG has an eXIf chunk, before or after its pixels (both occur): its chunks' headers are walked
    (~0.5 µs a chunk; a 28×28 PNG has 4, one of 500 KB a few dozen), faster than searching the bytes."""
    position = 8
    while position + 8 <= len(data):
        kind = data[position + 4:position + 8]
        if kind == b"eXIf":
            return True
        if kind == b"IEND":
            return False
        position += 12 + int.from_bytes(data[position:position + 4], "big")  # length, type, data, CRC
    return False


SCALED_DECODE_AVAILABLE = simplejpeg is not None
Decode = Callable[[bytes, int], torch.Tensor]  # (encoded bytes, channels) -> uint8 C×H×W; raises on damaged data


def decode_image(data: bytes, channels: int | None) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor C×H×W, upright (EXIF orientation applied), 16-bit images reduced to
    their high byte. channels: 1 (grey), 3 (RGB), or None: as stored (1 for a grey image, 3 for any other).
    Raises on damaged data."""
    if channels is not None and plain_png(data, channels):
        return decode_png(bytes(data), mode="GRAY" if channels == 1 else "RGB")  # raises on damaged data
    mode = {1: "L", 3: "RGB", None: None}[channels]
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and mode:
            image.draft(mode, None)  # decode straight into the wanted mode
        image.load()  # decodes (raises on damaged data); a PNG's eXIf chunk may come after the pixels
        turn = UPRIGHT.get(orientation(image))
        if image.mode in SIXTEEN_BIT:  # PIL's convert would clip 16-bit values to 255: white
            image = Image.fromarray((np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
        mode = mode or ("L" if image.mode in GREY_MODES else "RGB")
        if image.mode != mode:
            image = image.convert(mode)
        if turn is not None:
            image = image.transpose(turn)
        pixels = torch.from_numpy(np.array(image))  # a writable array
    return pixels.unsqueeze(0) if mode == "L" else pixels.permute(2, 0, 1)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image (1-8; 1, as stored, when it has no EXIF or a bad value)."""
    if "exif" not in image.info:  # no EXIF: no parsing at all
        return 1
    try:
        value = image.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels as stored
        return 1
    return value if value in UPRIGHT else 1


def jpeg_orientation(data) -> int:
    """The EXIF orientation of a JPEG (1 when it has none), from its header alone (bytes, or a NumPy array of
    them): the application segments after SOI are walked, where EXIF lives (an APP1 segment, first or after
    JFIF's APP0), up to the first other segment; usually one or two steps, about a microsecond each."""
    position, end = 2, len(data)
    while position + 4 <= end and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE):  # past the application segments and comments
            return 1
        length = int.from_bytes(bytes(data[position + 2:position + 4]), "big")
        if marker == 0xE1 and bytes(data[position + 4:position + 10]) == b"Exif\0\0":
            return exif_orientation(bytes(data[position + 10:position + 2 + length]))
        position += 2 + length
    return 1


def exif_orientation(tiff: bytes) -> int:
    """The orientation tag of EXIF's first directory (a TIFF header, then 12-byte entries), 1 if none or damaged."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    directory = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[directory:directory + 2], order)
    for entry in range(directory + 2, directory + 2 + 12 * count, 12):
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry:entry + 2], order) == ORIENTATION:
            short = int.from_bytes(tiff[entry + 2:entry + 4], order) == 3  # the tag's type: SHORT
            value = int.from_bytes(tiff[entry + 8:entry + 10], order) if short else 1
            return value if value in UPRIGHT else 1
    return 1


MAX_SIDE_RATIO = 20  # a thinner image would be enormous once its shorter side is resized to a model's size


class ImageRefused(ValueError):
    """An image refused by its header, before any pixel is decoded: `why` is "not an image", "too many pixels"
    or "too thin"; `width` and `height` are the header's (0 when it has none)."""

    def __init__(self, why: str, width: int = 0, height: int = 0, cause: str = ""):
        super().__init__(why)
        self.why, self.width, self.height, self.cause = why, width, height, cause


def header_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an encoded image from its header alone, or ImageRefused: not an image PIL can open,
    more than `max_pixels` (a decompression bomb costs its header), or sides beyond MAX_SIDE_RATIO:1. What
    recog.identify and recog.serve check before decoding an image they were given."""
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # beyond PIL's own limit
        raise ImageRefused("too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageRefused("not an image", cause=type(e).__name__) from None
    if width * height > max_pixels:
        raise ImageRefused("too many pixels", width, height)
    if max(width, height) > MAX_SIDE_RATIO * max(1, min(width, height)):
        raise ImageRefused("too thin", width, height)
    return width, height


def decode_sample(sample: dict, channels: int, decode: Decode | None = None,
                  unlabelled: int | None = None) -> tuple[torch.Tensor, int]:
    """Raw sample dict -> (uint8 image tensor C×H×W, class index). Raises on anything undecodable.
    decode: how to decode the image's bytes; None: decode_image. unlabelled: the label of a sample without `cls`
    (None: such a sample is undecodable, as training needs a label)."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"no image ({'/'.join(IMAGE_KEYS)}) in sample {sample.get('__key__')}")
    image = (decode or decode_image)(sample[key], channels)
    return image, (unlabelled if "cls" not in sample and unlabelled is not None else int(sample["cls"]))


def decode_or_skip(sample: dict | None, channels: int, strict: bool, strict_option: str,
                   decode: Decode | None = None, unlabelled: int | None = None) -> tuple[torch.Tensor, int] | None:
    """decode_sample's image and label, or None for a sample to skip and count: an unreadable one (None: its
    reader warned) or an undecodable one (no image, damaged bytes, a label that is no number), logged as a
    warning; with `strict`, an undecodable sample stops the run with one sentence naming `strict_option`."""
    if sample is None:
        return None
    try:
        return decode_sample(sample, channels, decode, unlabelled)
    except Exception as e:  # PIL and the decoders raise many kinds
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        if strict:
            raise DataError(f"sample {where} could not be decoded ({type(e).__name__}: {e}); fix it or set "
                            f"{strict_option}=false.") from e
        log.warning("skipping undecodable sample %s (%s: %s)", where, type(e).__name__, e)
        return None


REDUCTIONS = (8, 4, 2)  # libjpeg-turbo's DCT scaling, 1/8 to 1/2 (its other M/8 scales decode no faster than 1/1)
COLOURSPACES = ("Gray", "YCbCr", "RGB")  # libjpeg-turbo converts these as PIL does; CMYK and YCCK go to PIL
GRID_TOLERANCE = 0.05  # reduced pixels: how far the resize's sampling grid may sit from the crop's edge
MAX_SKIP = 48  # extra output pixels the resize may compute to bring its grid there (see sampling_grid)


class CropWhileDecoding:
    """`crop(decode_image(data, channels))` in one step, for a torchvision v2 RandomResizedCrop (bilinear,
    antialiased): the JPEG decoded by libjpeg-turbo, at reduced size where the crop allows.

    The crop is drawn as `crop` draws it, with the same calls to torch's RNG, from the size in the JPEG's
    header. The JPEG is then decoded at the smallest of 1/8, 1/4 and 1/2 of its size at which the crop still
    covers the output size (libjpeg-turbo's DCT scaling: less inverse DCT, colour conversion and resizing;
    the entropy decoding stays), else at full size, and the crop's box, in reduced pixels, resized to the
    output. A crop decoded at full size comes out exactly as `crop` gives it (libjpeg-turbo decodes as PIL's
    does); a reduced one differs by the reduction's filter (about one level of 255 on average: docs/data.md).
    Other formats (PNG, WebP), CMYK JPEGs, JPEGs with an EXIF orientation other than 1 (libjpeg-turbo decodes
    them as stored, not upright), and JPEGs libjpeg-turbo stops at go through decode_image as without; an image
    that cannot be decoded raises and draws nothing, as without.
    """

    def __init__(self, crop: v2.RandomResizedCrop):
        self.crop = crop
        self.size = list(crop.size)  # (height, width)
        # torchvision renamed _get_params to make_params in 0.21
        self.draw = getattr(crop, "make_params", None) or crop._get_params

    def __call__(self, data: bytes, channels: int) -> torch.Tensor:
        try:
            height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # not a JPEG, or a header libjpeg-turbo cannot read
            colourspace = None
        if colourspace not in COLOURSPACES or jpeg_orientation(data) != 1:
            return self.crop(decode_image(data, channels))
        before = torch.get_rng_state()
        box = self.draw([torch.empty(1, 1, 1).expand(1, height, width)])  # only the size is read: no pixels
        reduction, grid = self.plan(box)
        try:
            pixels = torch.from_numpy(simplejpeg.decode_jpeg(
                data, colorspace="GRAY" if channels == 1 else "RGB",
                min_height=math.ceil(height / reduction), min_width=math.ceil(width / reduction)))  # H×W×C
        except ValueError:  # damaged (PIL then raises too), or a warning libjpeg-turbo stops at and PIL passes
            try:
                pixels, reduction = decode_image(data, channels).permute(1, 2, 0), 1
            except Exception:
                torch.set_rng_state(before)  # as without: an image that cannot be decoded draws nothing
                raise
        if reduction == 1:  # what self.crop gives with these draws, to the bit; resizing a contiguous copy of the
            # crop (channels last) rather than the crop of the image is ~2x faster
            top, left = box["top"], box["left"]
            region = pixels[top:top + box["height"], left:left + box["width"]].contiguous()
            return F.resize(region.permute(2, 0, 1), self.size, interpolation=v2.InterpolationMode.BILINEAR,
                            antialias=True)
        return resize_on_grid(pixels, *grid)

    def plan(self, box: dict) -> tuple[int, list[Grid]]:
        """How many times smaller the JPEG is decoded for this crop (8, 4, 2, or 1: full size), and the
        resize's grid of rows and of columns there. The crop, so reduced, must still cover the output (the
        resize only shrinks), and each grid must meet the crop's edge (else: the next smaller reduction)."""
        for reduction in REDUCTIONS:
            if box["height"] < reduction * self.size[0] or box["width"] < reduction * self.size[1]:
                continue
            grid = [sampling_grid(box[start] / reduction, box[length] / reduction, out)
                    for start, length, out in (("top", "height", self.size[0]), ("left", "width", self.size[1]))]
            if all(g is not None for g in grid):
                return reduction, grid
        return 1, []

    def __repr__(self) -> str:
        return f"CropWhileDecoding({self.crop})"


class Grid(NamedTuple):
    """Where a resize samples, along one axis: outputs skip, skip + 1, ... skip + out - 1 of an antialiased
    resize of pixels first to stop (exclusive) at `step` pixels per output."""

    first: int
    stop: int
    skip: int
    step: float
    out: int


def sampling_grid(start: float, length: float, out: int) -> Grid | None:
    """The grid on which the resize of pixels [start, start + length) to `out` pixels samples (to within
    GRID_TOLERANCE); None if there is none.

    torch's resize starts its grid at a whole pixel, the crop's edge may fall between two (a reduced pixel
    covers 2-8 source pixels); computing `skip` more outputs before the crop moves the grid by skip × step,
    which for some skip (not for every step: 1.0 never) brings it to the edge. `first` may be below 0 (where
    no skip brings it there from inside the image).
    """
    step, outside = length / out, None
    for skip in range(MAX_SKIP + 1):
        first = math.floor(start - skip * step + 0.5)
        if abs(first + skip * step - start) <= GRID_TOLERANCE:
            if first >= 0:
                return Grid(first, math.ceil(start + length), skip, step, out)
            outside = outside or Grid(first, math.ceil(start + length), skip, step, out)
    return outside


def resize_on_grid(pixels: torch.Tensor, rows: Grid, cols: Grid) -> torch.Tensor:
    """uint8 H×W×C pixels -> C×rows.out×cols.out, an antialiased bilinear resize on these grids: what
    torchvision's resize of the crop gives, but for the outermost output pixels, whose filter reaches a
    little past the crop's edge where torchvision's stops at it."""
    region = pixels[max(rows.first, 0):rows.stop, max(cols.first, 0):cols.stop]
    # A grid that starts before the image: its edge repeated (only skipped outputs see those pixels).
    if rows.first < 0:
        region = torch.cat([region[:1].expand(-rows.first, -1, -1), region])
    if cols.first < 0:
        region = torch.cat([region[:, :1].expand(-1, -cols.first, -1), region], 1)
    # The op F.interpolate(mode="bilinear", antialias=True) calls, given the output size and the scale apart
    # (interpolate takes one or the other). Channels-last uint8 input takes its vectorised path, and a
    # contiguous one is faster still (~1/4) than a crop of the decoded image.
    resized = torch.ops.aten._upsample_bilinear2d_aa(region.contiguous().permute(2, 0, 1)[None],
                                                     [rows.skip + rows.out, cols.skip + cols.out], False,
                                                     1 / rows.step, 1 / cols.step)
    return resized[0, :, rows.skip:, cols.skip:]


def crop_while_decoding(transform: Callable | None) -> tuple[Decode, Callable | None]:
    """(decode, rest) with rest(decode(data, channels)) what transform(decode_image(data, channels)) gives: a
    transform that starts with a v2 RandomResizedCrop (bilinear, antialiased) has it done while decoding
    (CropWhileDecoding) and the rest after it; any other stays whole, after decode_image."""
    steps = list(transform.transforms) if isinstance(transform, (v2.Compose, transforms_v1.Compose)) else [transform]
    first = steps[0]
    if not (SCALED_DECODE_AVAILABLE and type(first) is v2.RandomResizedCrop and first.antialias
            and first.interpolation in (v2.InterpolationMode.BILINEAR, "bilinear")):
        return decode_image, transform
    rest = steps[1:]
    return CropWhileDecoding(first), (type(transform)(rest) if len(rest) > 1 else rest[0] if rest else None)
