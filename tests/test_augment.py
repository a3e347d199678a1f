"""The small-image augmentation ops against torchvision's own, pixel for pixel; the training crop taken while
decoding (JPEGs at a reduced scale) against decoding in full, then cropping."""

import functools
import io

import numpy as np
import pytest
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from recog.data.augment import FitSize, RandomFlip, RandomShift
from recog.data.decode import CropWhileDecoding, crop_while_decoding, decode_image
from recog.testing import photo_like_jpeg

# Mean absolute difference, in levels of 255, of reduced decoding + crop from full decoding + the same crop: at
# most the first for any image, the second on average over the reduced ones. Measured: these images at most
# 1.7, 1.2 on average; bench/decode.py at 224 px at most 2.1, 1.0 on average; at 112 px up to 3.3 on two real
# photos (largest where the reduced crop is barely above the output size), 1.1 on average.
# Saving such a photo again at quality 90 changes its crops by 1.4-2.2.
MAX_DIFFERENCE, MEAN_DIFFERENCE = 3.0, 1.5


def test_random_shift_gives_exactly_the_crops_of_a_padded_image():
    image = torch.randint(1, 256, (3, 12, 10), dtype=torch.uint8)  # no zeros: the fill shows
    pad = 3
    padded = F.pad(image, (pad, pad, pad, pad))
    crops = {padded[:, top:top + 12, left:left + 10].numpy().tobytes()
             for top in range(2 * pad + 1) for left in range(2 * pad + 1)}
    torch.manual_seed(0)
    seen = {RandomShift(pad)(image).numpy().tobytes() for _ in range(2000)}
    assert seen == crops  # every one of the 49 crops v2.RandomCrop(padding=3) can give, and nothing else
    torchvision_seen = {v2.RandomCrop((12, 10), padding=pad)(image).numpy().tobytes() for _ in range(2000)}
    assert torchvision_seen == crops
    assert RandomShift(0)(image) is image


def test_random_flip_mirrors_at_the_given_rate():
    image = torch.arange(12, dtype=torch.uint8).reshape(1, 3, 4)
    torch.manual_seed(0)
    flips = [torch.equal(RandomFlip(0.25)(image), image.flip(-1)) for _ in range(4000)]
    assert 0.22 < sum(flips) / len(flips) < 0.28
    assert all(torch.equal(RandomFlip(0)(image), image) for _ in range(100))


def test_fit_size_resizes_only_other_sizes():
    square = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    assert FitSize(28)(square) is square
    wide = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    expected = v2.CenterCrop(28)(v2.Resize(28, antialias=True)(wide))
    assert torch.equal(FitSize(28)(wide), expected)


@functools.cache
def jpegs() -> list[bytes]:
    """Photo-like JPEGs at quality 90: 500x375 (grey and colour), and 1000x750 (1/8 reductions at 56 px)."""
    rng = np.random.default_rng(0)
    return ([photo_like_jpeg(rng, 500, 375) for _ in range(6)] + [photo_like_jpeg(rng, 500, 375, grey=True)
            for _ in range(3)] + [photo_like_jpeg(rng, 1000, 750) for _ in range(2)])


def test_crop_while_decoding_takes_the_same_crop_and_differs_by_at_most_the_bound():
    differences, reductions = [], set()
    for size in (224, 112, 56):  # at 224 no crop of a 500x375 image allows a reduction; at 56, 1/8 of 1000x750
        augment = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
        decode, rest = crop_while_decoding(augment)
        assert isinstance(decode, CropWhileDecoding) and isinstance(rest, v2.RandomHorizontalFlip)
        for i, data in enumerate(jpegs()):
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            for channels in (3, 1):
                torch.manual_seed(i)
                expected, after_full = augment(decode_image(data, channels)), torch.get_rng_state()
                torch.manual_seed(i)
                box = augment.transforms[0].make_params([torch.empty(1, 1, 1).expand(1, height, width)])
                torch.manual_seed(i)
                image = rest(decode(data, channels))
                # the same crop and flip drawn, so the RNG is where full decoding leaves it
                assert torch.equal(torch.get_rng_state(), after_full)
                assert image.shape == expected.shape == (channels, size, size) and image.dtype == torch.uint8
                reduction = decode.plan(box)[0]
                reductions.add(reduction)
                if reduction == 1:  # decoded in full: what the transform gives, to the bit
                    assert torch.equal(image, expected)
                else:
                    differences.append((image.float() - expected.float()).abs().mean().item())
    assert reductions == {1, 2, 4, 8}
    assert max(differences) <= MAX_DIFFERENCE and np.mean(differences) <= MEAN_DIFFERENCE, differences


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_crop_while_decoding_leaves_other_images_to_pil_and_raises_on_damage_drawing_nothing():
    crop = v2.RandomResizedCrop(32, antialias=True)
    decode = CropWhileDecoding(crop)
    photo = Image.open(io.BytesIO(jpegs()[0]))
    for data in (encoded(photo, "PNG"), encoded(photo, "WEBP"), encoded(photo.convert("CMYK"), "JPEG")):
        torch.manual_seed(0)
        expected, after = crop(decode_image(data, 3)), torch.get_rng_state()
        torch.manual_seed(0)
        assert torch.equal(decode(data, 3), expected) and torch.equal(torch.get_rng_state(), after)
    good = jpegs()[0]
    for damaged in (good[: len(good) // 2], good[:400] + bytes(2000), b"not an image"):
        before = torch.get_rng_state()
        with pytest.raises((OSError, ValueError)):
            decode_image(damaged, 3)  # as without
        with pytest.raises((OSError, ValueError)):
            decode(damaged, 3)
        assert torch.equal(torch.get_rng_state(), before)  # it drew nothing: the next images' crops are unchanged


def test_only_a_leading_bilinear_random_resized_crop_is_taken_into_decoding():
    crop, flip = v2.RandomResizedCrop(64, antialias=True), v2.RandomHorizontalFlip()
    decode, rest = crop_while_decoding(crop)
    assert isinstance(decode, CropWhileDecoding) and rest is None
    decode, rest = crop_while_decoding(v2.Compose([crop, flip, v2.RandomVerticalFlip()]))
    assert isinstance(decode, CropWhileDecoding) and [type(t) for t in rest.transforms] == [
        v2.RandomHorizontalFlip, v2.RandomVerticalFlip]
    for other in (v2.Compose([FitSize(64), crop]), v2.RandomResizedCrop(64, interpolation="bicubic"), flip, None):
        assert crop_while_decoding(other) == (decode_image, other)
