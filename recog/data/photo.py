"""The `photo` augment preset's training transform (conf/augment/photo.yaml), all torchvision.transforms.v2, on one
uint8 image C×H×W (1 or 3 channels) in a data-loader worker, as the other presets' transforms receive it:

RandomResizedCrop to `size` (8-100 % of the image) -> RandomHorizontalFlip(`flip`) -> TrivialAugmentWide
(`auto_augment: trivial`, the torchvision reference recipe's and timm's choice) or RandAugment (`rand`: 2 ops at
magnitude 9) or neither (`none`) -> RandomErasing (`erase`: its probability; the erased box is filled with 0,
black, as the image is still uint8 pixels here).

Everything draws from torch's RNG, which the stream seeds per batch, so an epoch's images are the same on a
resume. The leading RandomResizedCrop keeps data.jpeg_scaled_decode's crop-while-decoding (recog/data/decode.py).
"""

from __future__ import annotations

from torchvision.transforms import v2

AUTO_AUGMENTS = ("trivial", "rand", "none")


def photo_train(size: int, flip: float = 0.5, auto_augment: str = "trivial", erase: float = 0.0) -> v2.Compose:
    """The photo preset's training transform for images of `size` × `size` pixels."""
    if auto_augment not in AUTO_AUGMENTS:
        raise ValueError(f"auto_augment={auto_augment} is not one of {', '.join(AUTO_AUGMENTS)}")
    steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(p=flip)]
    if auto_augment == "trivial":
        steps.append(v2.TrivialAugmentWide())
    elif auto_augment == "rand":
        steps.append(v2.RandAugment())
    if erase > 0:
        steps.append(v2.RandomErasing(p=erase, value=0))
    return v2.Compose(steps)
