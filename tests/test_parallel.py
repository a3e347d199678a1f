"""Speed knobs (recog/parallel.py): accumulation, precision, compression hooks, and the combinations
that cannot work. The DDP version of the accumulation check runs in dist_checks.py."""

import json

import pytest
import torch
from accumulation import accumulation_max_difference, one_optimizer_step
from conftest import run_train, tiny_args

from recog import dist
from recog.config import check_perf_config
from recog.errors import ConfigError
from recog.rundir import compose_train_config


def test_accumulating_4_batches_equals_one_step_on_the_4x_batch():
    ctx = dist.Dist(0, 0, 1, 1, torch.device("cpu"), None)
    assert accumulation_max_difference(ctx) < 1e-6
    # and the check can fail: without dividing each micro-batch's loss by the rank's share of the global batch the
    # step would be 4x too large
    g = torch.Generator().manual_seed(100)
    from recog.data.loader import Batch

    images = torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (32,), generator=g)
    one = one_optimizer_step(ctx, Batch(images, labels, 0), 32)
    summed = one_optimizer_step(ctx, Batch(images.repeat(4, 1, 1, 1), labels.repeat(4), 0, sizes=(32,) * 4), 128)
    assert max((one[k] - summed[k]).abs().max().item() for k in one) < 1e-6


@pytest.mark.parametrize("overrides,message", [
    (["perf.precision=fp16"], "perf.precision=fp16 needs a GPU"),
    (["perf.precision=fp8"], "perf.precision=fp8 is unknown"),
    (["perf.sync_bn=true"], "perf.sync_bn=true needs GPUs"),
    (["ddp.comm_hook=zip"], "ddp.comm_hook=zip is unknown"),
])  # accumulate=0 is one of check_config's numbers: tests/test_failures.py's table
def test_combinations_that_cannot_work_on_cpu_are_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_perf_config(compose_train_config(*overrides), cuda=False)


def test_gpu_only_knobs_pass_the_check_on_gpus():
    check_perf_config(compose_train_config("perf.precision=fp16", "perf.sync_bn=true"), cuda=True)


@pytest.mark.slow
@pytest.mark.parametrize("knobs", [
    ["perf.precision=bf16", "perf.channels_last=true", "ddp.comm_hook=fp16", "accumulate=2",
     "ddp.gradient_as_bucket_view=true", "ddp.bucket_cap_mb=1"],
    ["ddp.comm_hook=powersgd", "ddp.powersgd_start_step=2", "ddp.powersgd_rank=2", "ddp.static_graph=true",
     "ddp.bucket_cap_mb=0.01"],  # several buckets: PowerSGD's all-reduces from callbacks must not interleave on gloo
    ["ddp.comm_hook=bf16"],
])
def test_knobs_train_with_gloo_on_cpu(tiny_data, tmp_path, knobs):
    """bf16 autocast, channels_last, the fp16 and bf16 hooks, accumulation, PowerSGD: 2 gloo processes, 2 epochs."""
    result = run_train(tiny_args(tiny_data, epochs=2) + knobs + [f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    accumulate = 2 if "accumulate=2" in knobs else 1
    assert metrics["step"] == 2 * -(-16 // accumulate) and metrics["global_batch"] == 64 * accumulate
    assert metrics["top1"] > 0.3, metrics  # 10 classes: it learned (chance is 0.1)
    assert metrics["train_loss"] < 3.0
