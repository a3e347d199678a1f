"""The photo recipe together (issue 31): a timm backbone from a weights file, fine-tuned with layer decay, a lower
backbone LR, EMA, mixup + cutmix, clipping, a minimum LR and mid-epoch evaluations, stopped by SIGTERM and started
again with the same command, ends bit for bit where the uninterrupted run ends: weights, EMA, optimizer state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_train, tiny_args, train_cmd
from test_failures import finish, wait_for

from recog.checkpoint import load_checkpoint

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

STEPS = 16  # 2 epochs of 8 steps: 500 images a rank, 2 micro-batches of 32 a step


def recipe_args(tiny_data, weights: Path, run_dir: Path) -> list[str]:
    return tiny_args(tiny_data, epochs=2, batch_size=32, global_batch=128, **{
        "model": "timm", "model.backbone": "timm:test_resnet", "model.pretrained": weights,
        "model.embedding_dim": 32, "optim.layer_decay": 0.75, "optim.backbone_lr_scale": 0.5,
        "optim.clip_grad_norm": 1.0, "schedule.min_lr": 0.1, "ema.decay": 0.9, "ema.warmup": "true",
        "mixup.alpha": 0.8, "mixup.cutmix_alpha": 1.0, "eval.every_steps": 5, "checkpoint.every_steps": 2,
        "model.width": None, "hydra.run.dir": run_dir})


def test_the_photo_recipe_resumes_bit_exactly_after_sigterm(tiny_data, tmp_path):
    torch.manual_seed(5)
    weights = tmp_path / "test_resnet.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()},
                                str(weights))
    env = {"HF_HUB_OFFLINE": "1"}
    whole = run_train(recipe_args(tiny_data, weights, tmp_path / "whole"), cwd=tmp_path, extra_env=env, timeout=600)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]

    run_dir = tmp_path / "stopped"
    out = open(tmp_path / "torchrun.out", "w")
    proc = subprocess.Popen(train_cmd(2) + recipe_args(tiny_data, weights, run_dir), cwd=tmp_path, stdout=out,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    proc.out_path = Path(out.name)
    wait_for(run_dir, "step-000000006.pt", proc, timeout=300)  # after a mid-epoch evaluation (step 5)
    proc.send_signal(signal.SIGTERM)
    stopped = finish(proc)
    assert "preempted: stopped on SIGTERM at step" in stopped, stopped[-3000:]
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 6 <= stopped_at < STEPS, stopped_at
    weights.rename(weights.with_suffix(".gone"))  # a resume reads the checkpoint, not the pretrained file

    again = run_train(recipe_args(tiny_data, weights, run_dir), cwd=tmp_path, extra_env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-{stopped_at:09d}.pt" in again.stdout

    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == STEPS
    for part in ("model", "ema"):
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert a[part].keys() == b[part].keys() and not differ, (part, differ)
    assert not torch.equal(a["ema"]["embed.weight"], a["model"]["embed.weight"])
    groups = a["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [g["lr_scale"] for g in b["optimizer"]["param_groups"]]
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    # the head at 1; the backbone's top layer one layer of decay below it, times backbone_lr_scale, and so on down
    assert scales == [round(0.5 * 0.75 ** n, 6) for n in range(len(scales) - 1, 0, -1)] + [1.0], scales
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k]))
                   for k, v in state.items()), i
    whole_metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    again_metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("top1", "top5", "top1_ema"):
        assert whole_metrics[key] == again_metrics[key], key
