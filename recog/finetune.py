"""Fine-tuning controls: the LR and weight decay each parameter trains at (`parameter_groups`: optim.backbone_lr_scale,
optim.layer_decay, optim.no_weight_decay_norm_bias) and the backbone frozen for a run's first epochs, a linear probe
(`BackboneFreeze`: model.freeze_backbone_epochs). `check_finetune` checks their settings (and optim.clip_grad_norm's,
schedule.*'s) before any process group exists.

Parameters are grouped by (LR scale, weight decay or none), in the order the model lists them: with every setting
at its default that is the one group of the model's parameters recog always made, so a default run and its
checkpoints stay as they were. Each group keeps its `lr_scale`, which `recog.step.StepRecipe.load_state_dict`
re-applies on a resume.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from torch import nn

from recog.errors import ConfigError, check_number
from recog.sharded import ShardedClassifier

SCHEDULES = ("cosine", "step")  # schedule.name: recog.step.lr_schedule
HEAD = "recog.head"  # a name no timm group_matcher matches: the head's layer, above the backbone's (`layer_scales`)


@dataclass(frozen=True)
class GroupSettings:
    """How the optimizer's parameter groups are cut (the config's optim section)."""

    backbone_lr_scale: float = 1.0  # the backbone's LR as a multiple of the head's
    layer_decay: float | None = None  # timm's layer-wise LR decay over the backbone's layers (None: off)
    no_weight_decay_norm_bias: bool = False  # no weight decay on 1-d parameters (norms, biases) and timm's names

    @classmethod
    def from_config(cls, optim: DictConfig) -> GroupSettings:
        return cls(optim.get("backbone_lr_scale", 1.0), optim.get("layer_decay"),
                   bool(optim.get("no_weight_decay_norm_bias", False)))


def parameter_groups(model: nn.Module, loss_fn: nn.Module, lr: float, settings: GroupSettings = GroupSettings()
                     ) -> list[dict]:
    """The optimizer's parameter groups. The model's backbone at `lr` × backbone_lr_scale (× its layer's scale with
    layer_decay), its embedding head and classifier at `lr`; a sharded classifier's rows (held by the loss) at `lr`,
    in a group of their own; the loss's own parameters (proxies, ...) at `lr` × `loss_fn.lr_scale`. With
    no_weight_decay_norm_bias each of those is split again: weight decay 0 for norms, biases and what the backbone's
    `no_weight_decay()` names (timm: pos_embed, cls_token, ...). Each group keeps its `lr_scale`."""
    backbone = getattr(model, "backbone", None)
    layer = layer_scales(backbone, settings.layer_decay) if settings.layer_decay is not None else {}
    backbone_names = {f"backbone.{name}": name for name, _ in backbone.named_parameters()} if backbone else {}
    skip = tuple(getattr(backbone, "no_weight_decay", lambda: ())()) if settings.no_weight_decay_norm_bias else ()
    entries = []  # (parameter, its LR scale, no weight decay)
    for name, param in model.named_parameters():
        own = backbone_names.get(name)
        scale = settings.backbone_lr_scale * layer.get(own, 1.0) if own is not None else 1.0
        entries.append((param, scale, settings.no_weight_decay_norm_bias and no_decay(own or name, param, skip)))
    groups = grouped(entries, lr)
    classifier = getattr(loss_fn, "classifier", None)
    if isinstance(classifier, ShardedClassifier):  # its own group, as before: sharded checkpoints keep their layout
        groups.append({"params": [classifier.weight], "lr": lr, "lr_scale": 1.0})
    names = {id(p): n for n, p in loss_fn.named_parameters()}
    groups += grouped([(p, loss_fn.lr_scale, settings.no_weight_decay_norm_bias and no_decay(names[id(p)], p, ()))
                       for p in loss_parameters(loss_fn)], lr)  # none for a loss without parameters, as before
    return groups


def grouped(entries: list[tuple[nn.Parameter, float, bool]], lr: float) -> list[dict]:
    """One group per (LR scale, no weight decay), in the order of their first parameter."""
    groups: dict[tuple[float, bool], dict] = {}
    for param, scale, plain in entries:
        if (scale, plain) not in groups:
            groups[scale, plain] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                                    **({"weight_decay": 0.0} if plain else {})}
        groups[scale, plain]["params"].append(param)
    return list(groups.values())


def no_decay(name: str, param: nn.Parameter, names: tuple[str, ...]) -> bool:
    """timm's rule (timm.optim.param_groups_weight_decay): 1-d parameters (norms' scales and shifts, biases), a
    `.bias`, and the model's own `no_weight_decay()` names (fnmatch patterns)."""
    return param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, pattern) for pattern in names)


def layer_scales(backbone: nn.Module | None, decay: float) -> dict[str, float]:
    """timm's layer-wise LR decay (BEiT; timm.optim.param_groups_layer_decay) for each of the backbone's parameters
    (by its name in the backbone): its layers numbered by the backbone's own `group_matcher()` through timm's
    `group_with_matcher`, with recog's head as the parameters no pattern matches are, the top layer at scale 1
    (timm does so for its classifier); layer i of n at `decay` ** (n - 1 - i)."""
    if not hasattr(backbone, "group_matcher"):
        raise ConfigError(f"optim.layer_decay={decay} needs a timm backbone (model.backbone=timm:NAME), whose "
                          f"group_matcher() numbers its layers, and {type(backbone).__name__} has none; set "
                          "optim.layer_decay=null (optim.backbone_lr_scale lowers the whole backbone's LR).")
    from timm.models._manipulate import group_with_matcher  # timm: an optional extra, needed only here

    names = [name for name, _ in backbone.named_parameters()]
    layer = group_with_matcher(((name, None) for name in [*names, HEAD]), backbone.group_matcher(coarse=False),
                               reverse=True)
    top = max(layer.values())
    return {name: decay ** (top - layer[name]) for name in names}


def loss_parameters(loss_fn: nn.Module) -> list[nn.Parameter]:
    """The loss's own trained parameters (a proxy loss's proxies), not a sharded classifier's rows it holds."""
    classifier = getattr(loss_fn, "classifier", None)
    rows = classifier.weight if isinstance(classifier, ShardedClassifier) else None
    return [p for p in loss_fn.parameters() if p.requires_grad and p is not rows]


@dataclass
class BackboneFreeze:
    """model.freeze_backbone_epochs: for the run's first `epochs` epochs only the head trains (embedding, classifier,
    the loss's parameters); the backbone stays as it is: in eval mode (BatchNorm's statistics kept, no dropout) and
    left out of the optimizer's step (no update, no weight decay, no optimizer state).

    How, and why so: the backbone keeps requires_grad and its gradients are computed and all-reduced as in any step,
    then dropped (set to None) before the optimizer's step, which passes over a parameter without a gradient. The
    costlier-looking alternatives fail DDP: a backbone run under no_grad leaves parameters without gradients, which
    DDP refuses without find_unused_parameters (a slower search every step, for the whole run), and toggling
    requires_grad changes DDP's buckets, which means wrapping the model again at the unfreeze. Here DDP sees the
    same graph every step, and whether a step is frozen follows from the position alone (the epoch, which the
    checkpoint holds): a resume inside the frozen epochs or right after them takes exactly the steps an
    uninterrupted run takes. The price: the frozen epochs still pay for the backbone's backward pass."""

    backbone: nn.Module
    epochs: int

    def frozen(self, epoch: int) -> bool:
        return epoch < self.epochs

    def hold(self) -> None:
        """After the training model was put in train mode: the backbone back in eval mode."""
        self.backbone.eval()

    def drop_gradients(self) -> None:
        for param in self.backbone.parameters():
            param.grad = None


def describe(cfg: DictConfig, groups: int) -> str | None:
    """The log line of the fine-tuning settings that are on (None: all off)."""
    optim, frozen = cfg.optim, cfg.model.get("freeze_backbone_epochs", 0)
    on = [f"backbone LR x {optim.get('backbone_lr_scale', 1.0):g}" if optim.get("backbone_lr_scale", 1.0) != 1 else "",
          f"layer decay {optim.layer_decay:g}" if optim.get("layer_decay") is not None else "",
          "no weight decay on norms and biases" if optim.get("no_weight_decay_norm_bias") else "",
          f"gradients clipped to norm {optim.clip_grad_norm:g}" if optim.get("clip_grad_norm") is not None else "",
          f"backbone frozen for the first {frozen} epoch(s)" if frozen else ""]
    on = [part for part in on if part]
    return f"fine-tuning: {', '.join(on)} ({groups} parameter groups)" if on else None


def check_finetune(cfg: DictConfig) -> None:
    """optim.backbone_lr_scale, optim.layer_decay, optim.no_weight_decay_norm_bias, optim.clip_grad_norm,
    model.freeze_backbone_epochs and schedule.*: each wrong value one sentence, before any process group."""
    optim, schedule = cfg.optim, cfg.schedule
    check_number("optim.backbone_lr_scale", optim.get("backbone_lr_scale", 1.0), False, 0, False)
    decay = optim.get("layer_decay")
    if decay is not None:
        check_number("optim.layer_decay", decay, False, 0, True)
        if decay > 1:
            raise ConfigError(f"optim.layer_decay={decay} multiplies each lower layer's LR; give a number above 0 "
                              "and at most 1 (timm's recipes use 0.65-0.85), or null for none.")
        backbone = str(cfg.model.backbone)
        if not backbone.startswith("timm:"):
            raise ConfigError(f"optim.layer_decay={decay} needs a timm backbone (model.backbone=timm:NAME), whose "
                              f"group_matcher() numbers its layers, and {backbone} has none; set "
                              "optim.layer_decay=null (optim.backbone_lr_scale lowers the whole backbone's LR).")
    if not isinstance(optim.get("no_weight_decay_norm_bias", False), bool):
        raise ConfigError(f"optim.no_weight_decay_norm_bias={optim.no_weight_decay_norm_bias} is not valid; give "
                          "true or false.")
    if optim.get("clip_grad_norm") is not None:
        check_number("optim.clip_grad_norm", optim.clip_grad_norm, False, 0, True)
    check_number("model.freeze_backbone_epochs", cfg.model.get("freeze_backbone_epochs", 0), True, 0, False)
    name = schedule.get("name", "cosine")
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name={name} is unknown; use cosine (warmup, then a cosine to schedule.min_lr) "
                          "or step (warmup, then × schedule.gamma at each of schedule.milestones).")
    min_lr = schedule.get("min_lr", 0.0)
    check_number("schedule.min_lr", min_lr, False, 0, False)
    if min_lr >= 1:
        raise ConfigError(f"schedule.min_lr={min_lr} is a fraction of the peak LR; give a number from 0 to below 1.")
    milestones = schedule.get("milestones") or []
    if name == "step":
        check_number("schedule.gamma", schedule.get("gamma"), False, 0, True)
        if not OmegaConf.is_list(milestones) and not isinstance(milestones, list) or not milestones or any(
                isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in milestones) or list(
                milestones) != sorted(set(milestones)):
            raise ConfigError(f"schedule.milestones={milestones} is not valid for schedule.name=step; give the "
                              "epochs at which the LR is multiplied by schedule.gamma, ascending and above 0, e.g. "
                              "schedule.milestones=[30,60,80].")
    elif milestones:
        raise ConfigError(f"schedule.milestones={milestones} are the step schedule's, and schedule.name={name}; add "
                          "schedule.name=step, or leave schedule.milestones out.")
