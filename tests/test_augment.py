"""The small-image augmentation ops against torchvision's own, pixel for pixel."""

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from recog.data.augment import FitSize, RandomFlip, RandomShift


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
