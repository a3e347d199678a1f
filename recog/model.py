"""Backbone + L2-normalised embedding head + classifier. Knows nothing about distribution.

Backbones: `convnet` (a small CNN for 28×28 grey images, the CPU default), any torchvision classification
model by name (`resnet18`, `resnet50`, ...), or any timm model as `timm:NAME` (recog.backbones: timm removes its
head and adapts its stem itself, and loads pretrained weights). The torchvision head is removed here; its input
width becomes the feature width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from recog.backbones import check_timm_backbone, is_timm, timm_backbone
from recog.errors import ConfigError


class Output(NamedTuple):
    embeddings: torch.Tensor  # (n, embedding_dim), unit length
    logits: torch.Tensor  # (n, num_classes); (n, 0) for a model without its classifier (classifier="sharded")


CLASSIFIERS = ("replicated", "sharded")  # model.classifier


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def convnet(in_channels: int, width: int = 32, blocks: Sequence[int] = (2, 2, 2)) -> tuple[nn.Module, int]:
    """A VGG-style CNN: three stages of `blocks` 3×3 conv-BN-ReLU layers, `width`, 2× and 4× wide, each
    stage but the last followed by a 2×2 max-pool (28×28 -> 14 -> 7), then a global average pool."""
    layers, c_in = [], in_channels
    for stage, n in enumerate(blocks):
        c_out = width * 2 ** stage
        for _ in range(n):
            layers.append(conv_block(c_in, c_out))
            c_in = c_out
        if stage < len(blocks) - 1:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in


OWN_BACKBONES = {"convnet": convnet}


def check_backbone(name: str, small_input: bool = False, pretrained=False) -> None:
    """model.backbone, and model.small_input, which only a ResNet-style stem (conv1, then maxpool) can take: that
    is looked up on the model built on the meta device (no memory, no weights initialised, no random numbers).
    model.pretrained is for timm backbones (torchvision weights come through weights=)."""
    if is_timm(name):
        check_timm_backbone(name, pretrained, small_input)
        return
    if pretrained not in (None, False):
        raise ConfigError(f"model.pretrained is for timm backbones (model.backbone=timm:NAME), not '{name}'; set "
                          "model.pretrained=false and give torchvision weights with weights=/path/to/file.pth.")
    if name not in OWN_BACKBONES and name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"unknown model '{name}'; use model=convnet, model=resnet18, model=resnet50 "
            "or set model.backbone to any torchvision classification model name (or timm:NAME, any timm model)."
        )
    if small_input and name not in OWN_BACKBONES:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None)
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
            raise ConfigError(f"model.small_input=true is only for ResNet-style models, not '{name}'; set it to false.")


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Adapt a 3-channel torchvision stem to `in_channels` (e.g. 1 for grey images). Kept for torchvision, whose
    constructors have no `in_chans`; timm models get theirs from timm (recog.backbones)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride,
                    child.padding, child.dilation, child.groups, child.bias is not None,
                ))
                return


def _remove_head(model: nn.Module) -> int:
    """Replace the last Linear layer (the ImageNet classifier) by Identity; return its input width. Kept for
    torchvision, whose constructors have no `num_classes=0`; timm removes its own head (recog.backbones)."""
    last = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, name, child)
    if last is None:
        raise ConfigError("this torchvision model has no Linear classifier to replace; choose another backbone.")
    parent, name, linear = last
    setattr(parent, name, nn.Identity())
    return linear.in_features


def torchvision_backbone(name: str, in_channels: int, small_input: bool) -> tuple[nn.Module, int]:
    model = torchvision.models.get_model(name, weights=None)
    if small_input:  # 28-32 px images: a 3×3 stride-1 stem and no max-pool (the CIFAR ResNet stem; check_backbone)
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model, _remove_head(model)


class RecognitionModel(nn.Module):
    """features = backbone(x); embeddings = normalize(linear(features)); logits = cosine classifier.

    `classifier="sharded"`: the model holds no class rows (no `class_weights`; its logits are (n, 0)): they live in
    the loss, split across the ranks (recog.sharded.ShardedLoss, which reads the embeddings alone)."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        in_channels: int = 3,
        embedding_dim: int = 128,
        small_input: bool = False,
        width: int = 32,
        logit_scale: float = 16.0,
        blocks: Sequence[int] = (2, 2, 2),
        classifier: str = "replicated",
        pretrained: bool | str = False,
        timm_kwargs: dict | None = None,
        freeze_backbone_epochs: int = 0,  # a training setting (recog.finetune.BackboneFreeze): the model ignores it
    ):
        """`pretrained` and `timm_kwargs` (passed to timm.create_model) are for `backbone="timm:NAME"`."""
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ConfigError(f"model.classifier={classifier} is unknown; use replicated (every rank holds every "
                              "class's row) or sharded (each rank holds a slice of them).")
        check_backbone(backbone, small_input, pretrained)
        if is_timm(backbone):  # self.backbone is the timm model itself (its group_matcher, no_weight_decay, ...)
            self.backbone, features = timm_backbone(backbone, in_channels, pretrained, timm_kwargs)
        elif backbone in OWN_BACKBONES:
            self.backbone, features = OWN_BACKBONES[backbone](in_channels, width, blocks)
        else:
            self.backbone, features = torchvision_backbone(backbone, in_channels, small_input)
        self.embed = nn.Linear(features, embedding_dim)
        # Cosine classifier: logits are scaled cosines between the embedding and one
        # unit vector per class, so classification trains the same space retrieval uses.
        if classifier == "replicated":
            self.class_weights = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        else:  # no parameter at all (not an unused one, which DDP would wait for), no random numbers drawn
            self.register_parameter("class_weights", None)
        self.logit_scale = logit_scale

    def forward(self, images: torch.Tensor) -> Output:
        embeddings = F.normalize(self.embed(self.backbone(images)), dim=1)
        if self.class_weights is None:
            return Output(embeddings, embeddings.new_zeros(len(embeddings), 0))
        logits = self.logit_scale * embeddings @ F.normalize(self.class_weights, dim=1).t()
        return Output(embeddings, logits)


class ClassMap(NamedTuple):
    """How a run's classes take the rows of a classifier trained on other classes, matched by name: `source[i]` is
    the saved row of the run's class i, -1 for a class the saved one has not (new); `dropped`: the saved classes
    this run has not; `saved`: how many rows the saved classifier has; `names_from`: where the saved classes'
    names were read (for the log)."""

    source: tuple[int, ...]
    dropped: tuple[str, ...]
    saved: int
    names_from: str = "checkpoint"

    @property
    def kept(self) -> list[int]:
        return [i for i, row in enumerate(self.source) if row >= 0]

    @property
    def new(self) -> list[int]:
        return [i for i, row in enumerate(self.source) if row < 0]


def map_classes(saved: Sequence[str], classes: Sequence[str], names_from: str = "checkpoint") -> ClassMap:
    """The ClassMap from a classifier's classes (`saved`, in its row order) to a run's (`classes`, in label order)."""
    row = {name: i for i, name in enumerate(saved)}
    present = set(classes)
    return ClassMap(tuple(row.get(name, -1) for name in classes), tuple(n for n in saved if n not in present),
                    len(saved), names_from)


def move_rows(saved: torch.Tensor, fresh: torch.Tensor, mapping: ClassMap) -> torch.Tensor:
    """One row per run class: the saved row of each kept class (the same values, at its new index), `fresh`'s row
    for each new one."""
    rows = fresh.detach().clone()
    kept = mapping.kept
    rows[kept] = saved[[mapping.source[i] for i in kept]].to(rows.device, rows.dtype)
    return rows


def load_weights(model: RecognitionModel, state: dict, mapping: ClassMap | None = None) -> list[str]:
    """Load a recog checkpoint, a state dict of this model, or torchvision weights for the backbone alone.

    Torchvision weights lose their ImageNet classifier; an RGB stem is summed over its colour channels to fit a
    grey-image model. A recog classifier is taken row by row through `mapping` (its classes matched by name:
    recog.imprint); without one, a classifier for another number of classes is left out and starts fresh.
    Returns a note for each such change, for the log.
    """
    state = state.get("model", state)
    if not any(k.startswith("backbone.") for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}
    own = model.state_dict()
    check_embedding_width(state, model.embed.out_features)
    usable, notes = {}, []
    for key, value in state.items():
        if key not in own:  # the torchvision classifier, replaced by the embedding head
            continue
        if value.dim() == 4 and value.shape[1] == 3 and own[key].shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if key == "class_weights" and mapping is not None:
            value = move_rows(value, own[key], mapping)
        elif key == "class_weights" and value.shape[0] != own[key].shape[0]:
            notes.append(f"the weights' classifier is for {value.shape[0]} classes and this data has "
                         f"{own[key].shape[0]}: the classifier starts fresh, the rest is loaded")
            continue
        if value.shape != own[key].shape:
            raise ConfigError(
                f"weight {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}; "
                "set model.backbone (and model.width, model.embedding_dim, model.small_input) to what the "
                "weights were trained with."
            )
        usable[key] = value
    missing = [k for k in own if k.startswith("backbone.") and k not in usable]
    if missing:
        raise ConfigError(f"the weights lack {len(missing)} backbone entries (first: {missing[0]}); "
                          "check model.backbone matches the weights file.")
    model.load_state_dict(usable, strict=False)
    return notes


def check_embedding_width(state: dict, width: int) -> None:
    """Weights of a recog model make embeddings of one width, which its classifier's rows share: another
    model.embedding_dim cannot start from them."""
    saved = state.get("embed.weight")
    if saved is not None and saved.dim() == 2 and saved.shape[0] != width:
        raise ConfigError(f"the weights make {saved.shape[0]}-d embeddings and this model {width}-d ones; set "
                          f"model.embedding_dim={saved.shape[0]} to start from them.")


def state_mismatch(own: dict, saved: dict) -> str | None:
    """How a saved state dict differs from a model's, in a few words; None when it fits exactly."""
    missing, extra = [k for k in own if k not in saved], [k for k in saved if k not in own]
    if missing or extra:
        first = f"{missing[0]} missing" if missing else f"{extra[0]} not in this model"
        return f"{len(missing)} entries missing and {len(extra)} not in this model; first: {first}"
    for key, value in own.items():
        if saved[key].shape != value.shape:
            return f"{key} has shape {tuple(saved[key].shape)} where this model has {tuple(value.shape)}"
    return None
