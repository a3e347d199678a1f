"""Fine-tuning controls (recog/finetune.py) and LR schedules (recog/step.py): which parameter trains at which LR and
weight decay, timm's layer decay, gradient clipping, the frozen backbone, the schedules' values, the refusals, and
(under torchrun) an exact resume with them on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_train, tiny_args
from torch import nn

from recog.build import parameter_groups
from recog.checkpoint import load_checkpoint
from recog.config import check_config
from recog.data.loader import Batch
from recog.data.position import Position
from recog.errors import ConfigError
from recog.finetune import BackboneFreeze, GroupSettings
from recog.loss import RecognitionLoss
from recog.model import RecognitionModel
from recog.rundir import compose_train_config
from recog.step import StepRecipe, lr_schedule, warmup_cosine, warmup_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def convnet(seed: int = 0, classes: int = 4) -> RecognitionModel:
    torch.manual_seed(seed)
    return RecognitionModel("convnet", classes, in_channels=1, embedding_dim=8, width=4, blocks=(1, 1, 1))


def timm_model(name: str = "resnet10t", **kwargs) -> RecognitionModel:
    """A RecognitionModel whose backbone is a timm model made with num_classes=0, as model.backbone=timm:NAME makes
    it (the contract with recog's timm backbones): timm's group_matcher() and no_weight_decay() on `.backbone`."""
    timm = pytest.importorskip("timm")
    model = convnet()
    model.backbone = timm.create_model(name, num_classes=0, in_chans=1, **kwargs)
    model.embed = nn.Linear(model.backbone.num_features, 8)
    return model


def group_of(groups: list[dict], param: nn.Parameter) -> dict:
    return next(g for g in groups if any(p is param for p in g["params"]))


def config(*overrides: str):
    return compose_train_config(*overrides)


def test_the_defaults_keep_the_one_group_recog_always_made():
    """Every setting at its default: the model's parameters in one group in their order, the loss's own in a second,
    so a default run steps as before and its checkpoints keep their layout."""
    model = convnet()
    proxies = RecognitionLoss(metric=nn.Linear(2, 2), metric_weight=1.0, lr_scale=10.0)
    groups = parameter_groups(model, proxies, 0.1, GroupSettings.from_config(config().optim))
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in model.parameters()],
                                                              [id(p) for p in proxies.metric.parameters()]]
    assert [(g["lr"], g["lr_scale"], "weight_decay" in g) for g in groups] == [(0.1, 1.0, False), (1.0, 10.0, False)]


def test_backbone_lr_scale_and_no_weight_decay_on_norms_and_biases():
    model = convnet()
    loss_fn = RecognitionLoss(metric=nn.Linear(2, 2), metric_weight=1.0, lr_scale=10.0)
    groups = parameter_groups(model, loss_fn, 0.1, GroupSettings(backbone_lr_scale=0.25,
                                                                 no_weight_decay_norm_bias=True))
    conv, bn = model.backbone[0][0], model.backbone[0][1]
    expected = [  # parameter, its LR, no weight decay
        (conv.weight, 0.025, False), (bn.weight, 0.025, True), (bn.bias, 0.025, True),
        (model.embed.weight, 0.1, False), (model.embed.bias, 0.1, True), (model.class_weights, 0.1, False),
        (loss_fn.metric.weight, 1.0, False), (loss_fn.metric.bias, 1.0, True)]
    for param, lr, plain in expected:
        group = group_of(groups, param)
        assert group["lr"] == pytest.approx(lr) and group.get("weight_decay") == (0.0 if plain else None)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) + 2  # each parameter once
    # the optimizer's weight decay reaches only those without weight_decay=0
    optimizer = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.05)
    assert group_of(optimizer.param_groups, bn.weight)["weight_decay"] == 0.0
    assert group_of(optimizer.param_groups, conv.weight)["weight_decay"] == 0.05


def test_no_weight_decay_takes_timm_s_own_names():
    model = timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    assert {"pos_embed", "cls_token"} <= set(model.backbone.no_weight_decay())
    groups = parameter_groups(model, RecognitionLoss(), 0.1, GroupSettings(no_weight_decay_norm_bias=True))
    for param in (model.backbone.pos_embed, model.backbone.cls_token, model.backbone.blocks[0].norm1.weight):
        assert group_of(groups, param)["weight_decay"] == 0.0
    assert "weight_decay" not in group_of(groups, model.backbone.blocks[0].attn.qkv.weight)


def test_layer_decay_is_timm_s_with_the_head_as_its_classifier():
    """Each backbone parameter's LR scale is backbone_lr_scale × what timm's own param_groups_layer_decay gives it
    in the same timm model with a classifier; recog's head (embedding, classifier) takes the classifier's scale."""
    from timm.optim import param_groups_layer_decay

    model = timm_model()
    groups = parameter_groups(model, RecognitionLoss(), 0.1, GroupSettings(backbone_lr_scale=0.5, layer_decay=0.7))
    import timm

    full = timm.create_model("resnet10t", num_classes=4, in_chans=1)
    timm_scale = {id(p): g["lr_scale"] for g in param_groups_layer_decay(full, layer_decay=0.7) for p in g["params"]}
    timm_scale = {name: timm_scale[id(p)] for name, p in full.named_parameters()}
    scales = set()
    for name, param in model.backbone.named_parameters():
        group = group_of(groups, param)
        assert group["lr_scale"] == pytest.approx(0.5 * timm_scale[name]), name
        assert group["lr"] == pytest.approx(0.1 * group["lr_scale"])
        scales.add(round(timm_scale[name], 9))
    assert len(scales) >= 4 and min(scales) < 0.7 ** 3  # several layers, decayed
    for head in (model.embed.weight, model.class_weights):
        assert group_of(groups, head)["lr_scale"] == timm_scale["fc.weight"] == 1.0


def test_layer_decay_without_timm_s_group_matcher_is_one_sentence():
    with pytest.raises(ConfigError, match=r"optim.layer_decay=0.7 needs a timm backbone \(model.backbone=timm:NAME"
                                          r"\).* set optim.layer_decay=null"):
        parameter_groups(convnet(), RecognitionLoss(), 0.1, GroupSettings(layer_decay=0.7))
    with pytest.raises(ConfigError, match="needs a timm backbone .* and convnet has none; set optim.layer_decay=null"):
        check_config(config("optim.layer_decay=0.7"))


@pytest.mark.parametrize("overrides, message", [
    (["optim.backbone_lr_scale=-1"], "optim.backbone_lr_scale=-1 is not valid"),
    (["optim.layer_decay=1.5"], "optim.layer_decay=1.5 multiplies each lower layer's LR"),
    (["optim.no_weight_decay_norm_bias=maybe"], "optim.no_weight_decay_norm_bias=maybe is not valid"),
    (["optim.clip_grad_norm=0"], "optim.clip_grad_norm=0 is not valid; give a number above 0"),
    (["model.freeze_backbone_epochs=-1"], "model.freeze_backbone_epochs=-1 is not valid"),
    (["schedule.name=linear"], "schedule.name=linear is unknown; use cosine"),
    (["schedule.min_lr=1.0"], "schedule.min_lr=1.0 is a fraction of the peak LR"),
    (["schedule.name=step"], r"schedule.milestones=\[\] is not valid for schedule.name=step"),
    (["schedule.name=step", "schedule.milestones=[3,2]"], r"schedule.milestones=\[3, 2\] is not valid"),
    (["schedule.milestones=[2]"], r"schedule.milestones=\[2\] are the step schedule's"),
    (["model.classifier=sharded", "optim.clip_grad_norm=1.0"], "optim.clip_grad_norm=1.0 would clip each process"),
])
def test_wrong_settings_are_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(config(*overrides))


def test_the_default_schedule_is_the_cosine_it_was_and_min_lr_and_step_follow_their_definition():
    def before(step, warmup_steps, total_steps):  # recog's warmup_cosine before schedule.* existed
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    default = lr_schedule(config().schedule, steps_per_epoch=10, epochs=5)
    assert [default(s) for s in range(60)] == [before(s, 10, 50) for s in range(60)]  # bit for bit
    floor = lr_schedule(config("schedule.min_lr=0.1").schedule, steps_per_epoch=10, epochs=5)
    assert [floor(s) for s in (0, 9)] == [0.1, 1.0]  # the same warmup
    assert floor(10) == 1.0 and floor(30) == pytest.approx(0.1 + 0.9 * before(30, 10, 50))
    assert floor(50) == floor(99) == pytest.approx(0.1)
    step = lr_schedule(config("schedule.name=step", "schedule.milestones=[2,3.5]", "schedule.gamma=0.5",
                              "schedule.warmup_epochs=0.5").schedule, steps_per_epoch=10, epochs=5)
    assert [step(s) for s in (0, 4, 5, 19, 20, 34, 35, 49)] == [0.2, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert warmup_step(40, 0, (10, 20, 30), 0.1, min_lr=0.01) == 0.01  # 0.001, held at min_lr
    assert warmup_cosine(7, 2, 8, min_lr=0.2) == pytest.approx(0.2 + 0.8 * before(7, 2, 8))


def batch(seed: int, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                 torch.randint(0, 4, (n,), generator=g), 0)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("scaled", [False, True])
def test_clipping_bounds_the_step_to_the_norm_after_unscaling(scaled):
    """Plain SGD at LR 1 moves the weights by minus the gradient: the step's length is the clipped norm, 0.05 (the
    unclipped gradient is longer), also when a gradient scaler multiplies the loss by 2^16 first."""
    model = convnet()
    unclipped = StepRecipe(model, torch.optim.SGD(model.parameters(), lr=1.0), RecognitionLoss(), lr=1.0)
    unclipped.gradients(batch(0))
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert norm > 0.1
    model = convnet()
    scaler = torch.amp.GradScaler("cpu", enabled=scaled, init_scale=2.0 ** 16)
    recipe = StepRecipe(model, torch.optim.SGD(model.parameters(), lr=1.0), RecognitionLoss(), lr=1.0,
                        scaler=scaler, clip_grad_norm=0.05)
    before = flat(model)
    recipe.step(batch(0))
    assert (flat(model) - before).norm() == pytest.approx(0.05, rel=1e-4)


def test_a_frozen_backbone_keeps_its_weights_and_statistics_then_trains():
    """model.freeze_backbone_epochs=1: in epoch 0 the backbone's weights and BatchNorm statistics stay (AdamW's
    weight decay does not touch them either) while the head trains; from epoch 1 all of it trains."""
    model = convnet()
    position = Position()
    recipe = StepRecipe(model, torch.optim.AdamW(parameter_groups(model, RecognitionLoss(), 0.01), lr=0.01,
                                                 weight_decay=0.5), RecognitionLoss(), lr=0.01,
                        position=position, freeze=BackboneFreeze(model.backbone, 1))
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = model.embed.weight.detach().clone()
    recipe.trained.train()
    for i in range(3):
        recipe.step(batch(i))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())  # running_mean too
    assert not model.backbone.training and model.embed.training
    assert not torch.equal(head, model.embed.weight)
    assert all(p not in recipe.optimizer.state for p in model.backbone.parameters())  # no AdamW state either
    position.next_epoch()
    recipe.step(batch(3))
    assert model.backbone.training
    now = model.backbone.state_dict()
    assert not torch.equal(backbone["0.0.weight"], now["0.0.weight"])
    assert not torch.equal(backbone["0.1.running_mean"], now["0.1.running_mean"])


def test_resuming_a_checkpoint_of_other_parameter_groups_is_one_sentence(tmp_path):
    from recog.checkpoint import check_resume_point

    def recipe(scale: float) -> StepRecipe:
        model = convnet()
        groups = parameter_groups(model, RecognitionLoss(), 0.1, GroupSettings(backbone_lr_scale=scale))
        return StepRecipe(model, torch.optim.SGD(groups, lr=0.1), RecognitionLoss(), lr=0.1)

    saved = {**recipe(1.0).state_dict(), "config": {}}
    check_resume_point(("a.pt", saved), tmp_path, "convnet", recipe(1.0).mismatch)  # fits
    check_resume_point(("a.pt", {**recipe(0.5).state_dict(), "config": {}}), tmp_path, "convnet",
                       recipe(0.1).mismatch)  # another scale, the same groups: this run's scales are applied
    with pytest.raises(ConfigError, match=r"a.pt was saved with other optimizer parameter groups \(its optimizer "
                                          r"holds 1 parameter group\(s\) of \[\d+\] parameters and this run's 2 .*"
                                          "resume with the optim.backbone_lr_scale"):
        check_resume_point(("a.pt", saved), tmp_path, "convnet", recipe(0.5).mismatch)


@pytest.mark.slow
def test_a_resume_inside_and_right_after_the_frozen_epochs_is_bit_exact(tiny_data, tmp_path):
    """2 processes, 2 epochs of 8 steps: backbone frozen in epoch 1, at 0.5 × the LR, gradients clipped, the step
    schedule with a min_lr floor. Runs resumed from the uninterrupted run's checkpoint in the middle of the frozen
    epoch (step 4) and at its end (step 8) end with its weights and optimizer state, bit for bit. (Layer decay needs
    a timm backbone: its grouping is checked against timm above.)"""
    args = tiny_args(tiny_data, epochs=2, batch_size=64, **{
        "model.width": 8, "model.freeze_backbone_epochs": 1, "optim.backbone_lr_scale": 0.5,
        "optim.clip_grad_norm": 0.5, "optim.no_weight_decay_norm_bias": "true", "schedule.name": "step",
        "schedule.milestones": "[1.5]", "schedule.gamma": 0.1, "schedule.min_lr": 0.2, "checkpoint.every_steps": 4,
        "checkpoint.keep": 20})
    whole = run_train(args + [f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert ("fine-tuning: backbone LR x 0.5, no weight decay on norms and biases, gradients clipped to norm 0.5, "
            "backbone frozen for the first 1 epoch(s) (4 parameter groups)") in whole.stdout
    saved = tmp_path / "whole" / "checkpoints"
    first, frozen_end, last = (load_checkpoint(saved / f"step-{s:09d}.pt") for s in (4, 8, 16))
    backbone = [k for k in first["model"] if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(first["model"][k], frozen_end["model"][k]) for k in backbone)  # frozen, statistics too
    assert not torch.equal(first["model"]["embed.weight"], frozen_end["model"]["embed.weight"])
    assert not torch.equal(frozen_end["model"]["backbone.0.0.weight"], last["model"]["backbone.0.0.weight"])
    assert [g["lr_scale"] for g in last["optimizer"]["param_groups"]] == [1.0, 0.5, 0.5, 1.0]  # classifier first
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["step"] == 16
    for step in (4, 8):
        run_dir = tmp_path / f"from{step}"
        resumed = run_train(args + [f"resume={saved / f'step-{step:09d}.pt'}", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path)
        assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr
        other = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        assert other["step"] == 16
        assert all(torch.equal(last["model"][k], other["model"][k]) for k in last["model"]), step
        for i, state in last["optimizer"]["state"].items():
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(other["optimizer"]["state"][i][k]))
                       for k, v in state.items()), step
        assert [g["lr"] for g in other["optimizer"]["param_groups"]] == [g["lr"] for g in
                                                                         last["optimizer"]["param_groups"]]
