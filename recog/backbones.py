"""timm backbones (`model.backbone=timm:NAME`) and where their pretrained weights come from. Knows nothing about
distribution: which rank reads the weights first is recog.pretrained's business.

timm does the surgery itself: `num_classes=0` drops the classifier (the model then returns pooled features,
`num_features` wide) and `in_chans` adapts the stem (for grey images it sums the RGB filters of pretrained
weights). `RecognitionModel.backbone` is the timm model itself, so `group_matcher()`, `no_weight_decay()` and
`num_features` work on it.

`model.pretrained` is one of: false (random initialisation), true (timm's default weights for NAME, from the
Hugging Face Hub or its cache), a local `.safetensors` / `.pth` / `.bin` file, or a Hub id (`hf-hub:timm/NAME.TAG`
or `timm/NAME.TAG`). timm (>= 1.0.26, the extra's floor) reads every one of them without running code:
safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf
from torch import nn

from recog.errors import ConfigError

TIMM_PREFIX = "timm:"
TIMM_FLOOR = (1, 0, 26)  # the first timm whose every weights reader passes weights_only=True (1.0.25 passed False)
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".bin")
INSTALL = "pip install 'recog[timm]'"


def is_timm(backbone: str) -> bool:
    return str(backbone).startswith(TIMM_PREFIX)


def timm_name(backbone: str) -> str:
    return str(backbone)[len(TIMM_PREFIX):]


def import_timm():
    """timm, imported only when a timm backbone is asked for (the base install stays lean)."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.backbone=timm:... needs the timm package, which is not installed; run {INSTALL}."
                          ) from None
    version = tuple(int(part) for part in timm.__version__.split(".")[:3] if part.isdigit())
    if version < TIMM_FLOOR:
        raise ConfigError(f"timm {timm.__version__} is installed and recog needs timm >= "
                          f"{'.'.join(map(str, TIMM_FLOOR))} (earlier ones unpickle weights files, which can run "
                          f"code); run {INSTALL}.")
    return timm


class Pretrained(NamedTuple):
    """What model.pretrained asks for: kind is none, default (timm's weights for the model), file or hub."""

    kind: str
    where: str | None = None  # the file's path or the Hub id

    @property
    def on_hub(self) -> bool:
        return self.kind in ("default", "hub")


def pretrained_source(value) -> Pretrained:
    """model.pretrained read: false/null, true, a path ending in .safetensors/.pth/.bin, or a Hub id."""
    if value in (None, False, "false", "False"):
        return Pretrained("none")
    if value in (True, "true", "True"):
        return Pretrained("default")
    text = str(value)
    if text.startswith("hf-hub:") or (not text.lower().endswith(WEIGHTS_SUFFIXES) and text.count("/") == 1
                                      and not text.startswith((".", "/", "~"))):
        return Pretrained("hub", text.removeprefix("hf-hub:"))
    return Pretrained("file", text)


def check_timm_backbone(backbone: str, pretrained=False, small_input: bool = False) -> None:
    """model.backbone=timm:NAME and model.pretrained, as far as they are known without reading any file: timm is
    installed, knows NAME, and (pretrained=true) has weights for it; a weights path has a known suffix."""
    name = timm_name(backbone)
    timm = import_timm()
    if not name or not timm.is_model(name):
        pattern = name.split(".")[0].split("_")[0] or "resnet"
        raise ConfigError(f"timm has no model '{name}'; list the names it has with "
                          f"python -c \"import timm; print(timm.list_models('*{pattern}*'))\" and set "
                          "model.backbone=timm:NAME.")
    if small_input:
        raise ConfigError("model.small_input=true is for torchvision ResNets, not timm models (whose stem is "
                          f"theirs); set model.small_input=false for {backbone}.")
    source = pretrained_source(pretrained)
    if source.kind == "default" and not timm.list_pretrained(name if "." in name else f"{name}.*"):
        raise ConfigError(f"timm has no pretrained weights for '{name}'; set model.pretrained=false, a weights file "
                          "or a Hub id, or pick a model timm.list_models(pretrained=True) lists.")
    if source.kind == "file" and not source.where.lower().endswith(WEIGHTS_SUFFIXES):
        raise ConfigError(f"model.pretrained={source.where} is neither true/false, a weights file "
                          f"({', '.join(WEIGHTS_SUFFIXES)}) nor a Hub id (hf-hub:timm/NAME.TAG); give one of those.")


def check_pretrained_file(pretrained) -> None:
    """A local weights file that is not there, as one sentence (checked on a fresh start: a resume has the
    weights in its checkpoint and does not read the file)."""
    source = pretrained_source(pretrained)
    if source.kind == "file" and not Path(source.where).expanduser().is_file():
        raise ConfigError(f"model.pretrained={source.where}: no such file; give the path of the weights file "
                          "(.safetensors, .pth or .bin), or model.pretrained=false to start from random weights.")


def timm_backbone(backbone: str, in_channels: int, pretrained=False, timm_kwargs: dict | None = None
                  ) -> tuple[nn.Module, int]:
    """timm.create_model(NAME, num_classes=0, in_chans=in_channels) with the weights model.pretrained names;
    returns the model (its classifier removed by timm) and its feature width."""
    timm = import_timm()
    name, source = timm_name(backbone), pretrained_source(pretrained)
    overlay = {}
    if source.kind == "file":
        check_pretrained_file(pretrained)
        overlay = {"file": str(Path(source.where).expanduser())}
    elif source.kind == "hub":
        overlay = {"hf_hub_id": source.where}
    kwargs = OmegaConf.to_container(timm_kwargs, resolve=True) if OmegaConf.is_config(timm_kwargs) else \
        dict(timm_kwargs or {})
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(name, pretrained=source.kind != "none", num_classes=0, in_chans=in_channels,
                                  **kwargs)
    except OSError as e:  # no network and nothing cached (huggingface_hub's LocalEntryNotFoundError, URLError)
        if not source.on_hub:
            raise
        what = f"Hub id {source.where}" if source.kind == "hub" else f"timm's default weights for {name}"
        raise ConfigError(
            f"model.pretrained: could not download {what} and no copy is cached ({type(e).__name__}); download "
            "the weights file where the network allows and pass model.pretrained=/path/to/file.safetensors, or "
            "fill the Hugging Face cache (HF_HOME) there and set HF_HUB_OFFLINE=1.") from None
    except RuntimeError as e:  # a weights file that is not this model's, or that needs code to unpickle
        if source.kind == "none":
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.pretrained={pretrained} cannot be loaded into timm model {name} ({first[:300]}); "
                          "give weights saved from that model, as safetensors or a plain state dict.") from None
    # num_classes=0 returns the pre-logits features: head_hidden_size wide where a model has a head layer before its
    # classifier (MobileNetV3's 1024 after 288 num_features), num_features elsewhere
    return model, getattr(model, "head_hidden_size", None) or model.num_features


def pretrained_data_config(backbone: str, channels: int) -> dict:
    """The pretrained config's mean, std (one value per channel: for grey images the mean of the RGB values, as
    timm's adapted stem sums the RGB filters) and input size (px, the shorter side) for timm:NAME."""
    timm = import_timm()
    pretrained_cfg = timm.models.get_pretrained_cfg(timm_name(backbone))
    config = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else None)
    mean, std = list(config["mean"]), list(config["std"])
    if channels == 1:
        mean, std = [round(sum(mean) / len(mean), 4)], [round(sum(std) / len(std), 4)]
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "image_size": int(min(config["input_size"][1:]))}
