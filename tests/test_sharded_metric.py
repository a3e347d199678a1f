"""model.classifier=sharded with a metric-learning term (loss=ce_triplet, ce_multisimilarity, ce_proxyanchor) and
sampler=pk: ShardedLoss is RecognitionLoss with the cross-entropy computed by the sharded classifier, so the metric
term is RecognitionLoss's own code.

In one process: ShardedLoss's terms equal RecognitionLoss's on the same embeddings and rows, and an empty batch
gives every parameter (rows and proxies) a zero gradient. For real, train.py under torchrun with 2 gloo processes
on 512 training images, P×K batches of 5 × 8, each step's global batch of 120 cut into 3 micro-batches: rank 0
reads one, rank 1 two, so rank 0 makes an empty forward pass each step (StepRecipe.rounds), through the metric
term too:
  sharded     loss=ce_triplet (batch-hard triplets), model.classifier=sharded, SGD, 1 epoch of 4 steps
  replicated  the same with the default classifier, started from weights= holding the backbone the sharded run
              starts from and the rows its two ranks drew
  experiment  experiment=retrieval_fashion model.classifier=sharded, 1 epoch: recall@k, MAP@R and top-1 reported
  proxies     loss=ce_proxyanchor with the sharded classifier: the proxies (replicated, in DDP) train beside the rows
              (out of DDP) with empty forward passes on rank 0
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_train, tiny_args, tiny_split
from test_train import read_scalars

from recog.build import build_loss, parameter_groups
from recog.checkpoint import load_checkpoint
from recog.classifier_files import read_rows
from recog.model import Output, RecognitionModel
from recog.rundir import compose_train_config

CLASSES, DIM = 10, 128
# SGD (momentum, no AdamW): an update is linear in the gradient. The runs differ by the sharded loss's rounding (its
# log-sum-exp added over two ranks' partial sums), which these first steps amplify about tenfold a step once the
# triplet term is on (the loss rises from 4.35 to 10 over them; cross-entropy alone stayed at 6e-8 over two steps).
# Measured over the 4 steps: losses within 2e-6, backbone and rows within 6e-7 after step 2, within 7e-5 after step 4
# (the rows 3e-6). A mistake is far larger: a metric term lost on one rank or scaled wrongly changes a loss by > 1e-2
# and the weights by ~lr × its gradient (the 4 steps moved a weight by 7e-3: a hundred times WEIGHTS, 30 times LATER).
LOSS, WEIGHTS, LATER = 1e-5, 1e-5, 2e-4  # LATER: the weights after step 4


def loss_pair(name: str):
    """The sharded loss (one process: all rows) and the replicated one of conf/loss/`name`, the proxies equal."""
    shared = ["data.train=/nowhere/train", "data.test=/nowhere/test", f"loss={name}"]
    sharded = build_loss(compose_train_config(*shared, "model.classifier=sharded"), CLASSES)
    replicated = build_loss(compose_train_config(*shared), CLASSES)
    replicated.load_state_dict({k: v for k, v in sharded.state_dict().items() if not k.startswith("classifier.")})
    return sharded, replicated


@pytest.mark.parametrize("name", ["ce_triplet", "ce_multisimilarity", "ce_proxyanchor"])
def test_the_sharded_loss_has_the_replicated_terms(name):
    sharded, replicated = loss_pair(name)
    torch.manual_seed(1)
    embeddings = F.normalize(torch.randn(40, DIM), dim=1)
    labels = torch.arange(40) % CLASSES
    mine = sharded(Output(embeddings, embeddings[:, :0]), labels)
    theirs = replicated(Output(embeddings, sharded.classifier.logits(embeddings)), labels)
    assert sorted(mine) == sorted(theirs) == ["ce", "metric", "total"]
    for key in mine:
        assert mine[key].item() == pytest.approx(theirs[key].item(), rel=1e-6), key
    assert mine["metric"].item() > 0.01  # the term is there: the comparison can fail


@pytest.mark.parametrize("name", ["ce_triplet", "ce_proxyanchor"])
def test_an_empty_batch_gives_every_parameter_a_zero_gradient(name):
    """A rank's empty forward pass: the classifier is still called (its collectives), the loss is 0, and the rows and
    a proxy loss's proxies get a gradient, zero (DDP waits for one of each of its parameters)."""
    sharded, _ = loss_pair(name)
    empty = torch.zeros(0, DIM, requires_grad=True)
    total = sharded(Output(empty, empty[:, :0]), torch.zeros(0, dtype=torch.int64))["total"]
    total.backward()
    assert total.item() == 0.0
    params = list(sharded.parameters())
    assert len(params) == (2 if name == "ce_proxyanchor" else 1)
    assert all(p.grad is not None and not p.grad.any() for p in params)


def test_the_rows_train_at_the_models_lr_and_the_proxies_at_lr_scale():
    """The sharded rows are the model's classifier, trained at its LR as the replicated rows are; loss.lr_scale is
    the proxies' (100 for Proxy Anchor)."""
    sharded, _ = loss_pair("ce_proxyanchor")
    model = RecognitionModel("convnet", CLASSES, 1, width=16, classifier="sharded")
    groups = parameter_groups(model, sharded, 0.01)
    assert [(g["lr"], g["lr_scale"]) for g in groups] == [(0.01, 1.0), (0.01, 1.0), (pytest.approx(1.0), 100.0)]
    assert groups[1]["params"][0] is sharded.classifier.weight
    assert groups[2]["params"][0] is sharded.metric.proxies


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    # 512: no P×K batch of the epoch's 4 steps holds a sample twice. With 256, one of step 2's does, and after that
    # step the two runs' backbones were 8e-6 apart against 4e-8 after step 1 (cross-entropy alone: 6e-8): batch-hard
    # mining can pick between the two copies of an image on rounding, and its gradient jumps with the pick
    tiny_split(root / "train", "train", 512, 128)
    tiny_split(root / "test", "test", 96, 64)
    return {"train": root / "train", "test": root / "test"}


def args(data, run, **overrides):
    pk = {"sampler": "pk", "sampler.p": 5, "sampler.k": 8, "global_batch": 120, "loss": "ce_triplet", "optim": "sgd",
          "optim.lr": 0.01}
    return tiny_args(data, log_every=1, **{"checkpoint.keep": 3, "checkpoint.every_steps": 2, **pk, **overrides}) + [
        f"hydra.run.dir={run}"]


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sharded = run_train(args(small_data, root / "sharded", **{"model.classifier": "sharded"}), cwd=root)
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr

    torch.manual_seed(0)  # train.py's seed: the backbone and rows both runs start from (recog.build.build_loss)
    start = RecognitionModel("convnet", CLASSES, 1, width=16).state_dict()
    torch.save(start, root / "start.pt")
    replicated = run_train(args(small_data, root / "replicated"), cwd=root)  # no weights=: the same seed
    assert replicated.returncode == 0, replicated.stdout + replicated.stderr
    return {"root": root, "sharded": sharded, "replicated": replicated, "start": start}


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.slow
def test_sharded_triplet_training_on_pk_batches_equals_the_replicated_classifier(runs):
    """Same seed, same start, the same P×K batches: every step's loss (cross-entropy + triplets), the backbone and
    the rows after 2 steps equal the replicated run's within fp32 rounding (after 4, within its amplification)."""
    sharded, replicated = runs["root"] / "sharded", runs["root"] / "replicated"
    assert "per-rank batch 40, global batch 120" in runs["sharded"].stdout  # rank 0's line: 1 micro-batch of 3
    losses = read_scalars(sharded / "tb")["train/loss"], read_scalars(replicated / "tb")["train/loss"]
    assert len(losses[0]) == len(losses[1]) == 4
    assert max(abs(a - b) for a, b in zip(*losses)) < LOSS, losses
    for step, tolerance in ((2, WEIGHTS), (4, LATER)):
        mine = load_checkpoint(sharded / "checkpoints" / f"step-{step:09d}.pt")
        theirs = load_checkpoint(replicated / "checkpoints" / f"step-{step:09d}.pt")
        assert set(theirs["model"]) - set(mine["model"]) == {"class_weights"}
        for key, value in mine["model"].items():  # the backbone, the embedding head, BatchNorm's statistics
            assert largest(value, theirs["model"][key]) < tolerance, (step, key)
        rows = read_rows(sharded / "checkpoints" / f"step-{step:09d}.rows", range(CLASSES), total=CLASSES)
        assert largest(rows["weight"], theirs["model"]["class_weights"]) < tolerance, step
    last = load_checkpoint(sharded / "checkpoints" / "step-000000004.pt")["model"]
    moved = max(largest(value, runs["start"][key]) for key, value in last.items()
                if key.rsplit(".", 1)[-1] not in ("running_mean", "running_var", "num_batches_tracked"))
    assert moved > 100 * WEIGHTS  # the steps moved the weights: the comparison can fail
    top1 = [json.loads((run / "metrics.json").read_text())["top1"] for run in (sharded, replicated)]
    assert abs(top1[0] - top1[1]) <= 1 / 96  # at most one of the 96 test images on the other side of a near tie


@pytest.mark.slow
def test_the_retrieval_experiment_runs_with_a_sharded_classifier(small_data, tmp_path):
    """experiment=retrieval_fashion (P×K, cross-entropy + batch-hard triplets, retrieval metrics) with
    model.classifier=sharded, on 2 processes for 1 epoch of 6 steps (smaller P×K batches than the experiment's)."""
    overrides = {"experiment": "retrieval_fashion", "model.classifier": "sharded", "epochs": 1, "sampler.k": 8}
    result = run_train(tiny_args(small_data, **overrides) + [f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["step"] == 6
    for key in ("top1", "recall@1", "recall@5", "map@r"):
        assert 0.0 < metrics[key] <= 1.0, (key, metrics)
    assert "| recall@1 " in result.stdout and "| top-1 " in result.stdout


@pytest.mark.slow
def test_proxy_anchor_trains_beside_a_sharded_classifier(small_data, tmp_path):
    """loss=ce_proxyanchor: the proxies are the loss's parameters in DDP, the rows out of it; rank 0's empty forward
    passes give the proxies a zero gradient, so DDP's all-reduce completes, and the proxies stay equal on both ranks
    (rank 0 saves them) and move."""
    run = tmp_path / "run"
    result = run_train(args(small_data, run, loss="ce_proxyanchor", **{"model.classifier": "sharded"}), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    first = load_checkpoint(run / "checkpoints" / "step-000000002.pt")["loss"]["metric.proxies"]
    last = load_checkpoint(run / "checkpoints" / "step-000000004.pt")["loss"]["metric.proxies"]
    assert largest(first, last) > 1e-4
    losses = read_scalars(run / "tb")["train/loss"]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # no NaN
