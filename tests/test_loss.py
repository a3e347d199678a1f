"""Losses: cross-entropy alone, with a mined metric-learning term, with ArcFace's margin, and a proxy loss whose
parameters train with the model (one step here; equal on every rank under torchrun; across a kill in test_train)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recog.build import build_data, build_loss, build_recipe
from recog.config import check_against_data, check_config
from recog.data.manifest import load_manifest
from recog.dist import Dist
from recog.errors import ConfigError
from recog.loss import RecognitionLoss, additive_angular_margin
from recog.model import Output, RecognitionModel
from recog.rundir import compose_train_config

HERE = Path(__file__).parent


def batch():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(12, 8), dim=1).requires_grad_(True)
    labels = torch.arange(12) % 3
    return Output(emb, emb @ torch.nn.functional.normalize(torch.randn(3, 8), dim=1).t() * 16), labels




def loss_from_config(name: str, *overrides: str, num_classes: int = 3) -> RecognitionLoss:
    """conf/loss/<name>.yaml as train.py builds it, for batch()'s 8-dimensional embeddings."""
    return build_loss(compose_train_config(f"loss={name}", "model.embedding_dim=8", *overrides), num_classes)


def test_cross_entropy_alone():
    out, labels = batch()
    terms = RecognitionLoss()(out, labels)
    assert set(terms) == {"ce", "total"}
    assert torch.allclose(terms["total"], torch.nn.functional.cross_entropy(out.logits, labels))


@pytest.mark.parametrize("name", ["ce_triplet", "ce_multisimilarity", "ce_proxyanchor"])
def test_metric_term_from_config(name):
    loss_fn = loss_from_config(name)
    out, labels = batch()
    terms = loss_fn(out, labels)
    assert terms["metric"] > 0
    assert torch.allclose(terms["total"], terms["ce"] + terms["metric"])
    terms["total"].backward()
    assert out.embeddings.grad.abs().sum() > 0


def test_batch_hard_triplet_by_hand():
    from pytorch_metric_learning import losses, miners

    from recog.loss import MinedLoss

    # 1-D embeddings: class 0 at 0 and 1, class 1 at 1.5 and 3
    emb = torch.tensor([[0.0], [1.0], [1.5], [3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    loss = MinedLoss(losses.TripletMarginLoss(margin=1.0, distance=_euclidean()), miners.BatchHardMiner(
        distance=_euclidean()))(emb, labels)
    # hardest positive / negative per anchor: a0: p=1 (d1), n=1.5 (d1.5) -> 0.5; a1: p=0 (1), n=1.5 (0.5) -> 1.5
    # a2: p=3 (1.5), n=1 (0.5) -> 2.0; a3: p=1.5 (1.5), n=1 (2) -> 0.5
    assert loss.item() == pytest.approx((0.5 + 1.5 + 2.0 + 0.5) / 4)


def _euclidean():
    from pytorch_metric_learning.distances import LpDistance

    return LpDistance(normalize_embeddings=False)


def test_semi_hard_triplets_by_override():
    loss_fn = loss_from_config("ce_triplet",
                               "loss.metric.miner._target_=pytorch_metric_learning.miners.TripletMarginMiner",
                               "+loss.metric.miner.type_of_triplets=semihard", "+loss.metric.miner.margin=0.2")
    assert loss_fn.metric.miner.type_of_triplets == "semihard"
    out, labels = batch()
    assert torch.isfinite(loss_fn(out, labels)["total"])


# ---- ArcFace's margin on the model's cosine classifier ----

def test_arc_margin_equals_pytorch_metric_learnings_arcface_on_the_same_class_vectors():
    from pytorch_metric_learning.losses import ArcFaceLoss

    torch.manual_seed(0)
    emb, weights = torch.nn.functional.normalize(torch.randn(12, 8), dim=1), torch.randn(3, 8)
    labels = torch.arange(12) % 3
    logits = 16 * emb @ torch.nn.functional.normalize(weights, dim=1).t()  # what RecognitionModel computes, s = 16
    ours = RecognitionLoss(arc_margin=0.3, logit_scale=16.0)(Output(emb, logits), labels)["ce"]
    theirs = ArcFaceLoss(num_classes=3, embedding_size=8, margin=math.degrees(0.3), scale=16)
    theirs.W.data = weights.t().clone()  # its class vectors are columns
    assert ours.item() == pytest.approx(theirs(emb, labels).item(), rel=1e-5)
    assert ours > RecognitionLoss()(Output(emb, logits), labels)["ce"]  # the margin makes the task harder


def test_arc_margin_moves_only_the_target_logit_and_its_gradient_stays_finite():
    cos = torch.tensor([[1.0, 0.5, -1.0], [0.2, -1.0, 0.9]])  # a target at angle 0, one at π (past π - m)
    labels = torch.tensor([0, 1])
    logits = (16 * cos).requires_grad_(True)
    shifted = additive_angular_margin(logits, labels, 0.5, 16.0)
    others = torch.ones_like(cos, dtype=torch.bool).scatter(1, labels[:, None], False)
    assert torch.equal(shifted[others], logits[others])
    # s·cos(0 + m), up to the clamp of cos θ to 1 - 1e-6 (acos' slope is infinite at 1)
    assert shifted[0, 0].item() == pytest.approx(16 * math.cos(0.5), rel=1e-3)
    # beyond π - m: s·(cos θ - m sin m)
    assert shifted[1, 1].item() == pytest.approx(16 * (-1 - 0.5 * math.sin(0.5)), rel=1e-4)
    shifted.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(additive_angular_margin(logits, labels, 0.0, 16.0)[others], logits[others])


def test_the_arcface_config_takes_its_scale_from_the_model():
    loss_fn = loss_from_config("arcface", "model.logit_scale=30")
    assert loss_fn.arc_margin == 0.2 and loss_fn.logit_scale == 30.0 and not list(loss_fn.parameters())


@pytest.mark.parametrize("override,message", [("loss.arc_margin=2", "loss.arc_margin=2 is an angle in radians"),
                                              ("loss.lr_scale=-1", "loss.lr_scale=-1 is not valid")])
def test_bad_loss_values_are_one_sentence(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train_config("data.train=/x", "data.test=/y", override))


# ---- a loss with parameters of its own: trained, equal on every rank, checkpointed ----

def test_a_proxy_losss_parameters_change_in_one_step_at_their_own_lr(tiny_data):
    """build_recipe as train.py calls it: the proxies are in the optimizer (before, they were not: a proxy loss
    never learned), at loss.lr_scale × the model's LR; the model's state_dict stays free of them."""
    one = Dist(0, 0, 1, 1, torch.device("cpu"), None)
    cfg = compose_train_config(f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}",
                               "data.num_workers=0", "loss=ce_proxyanchor", "model.width=4", "batch_size=16")
    check_config(cfg)
    torch.manual_seed(0)
    data = build_data(cfg, one)
    recipe = build_recipe(cfg, one, data)
    proxies = recipe.loss_fn.metric.proxies
    assert proxies.shape[0] == 10 and cfg.loss.metric.num_classes == "auto"  # the shards' classes; cfg as given
    before = proxies.detach().clone()
    groups = recipe.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["params"] == [proxies]
    assert groups[1]["lr"] == pytest.approx(100 * groups[0]["lr"]) and groups[1]["lr_scale"] == 100.0
    images, labels = recipe.inputs(next(data.batches(data.start())))
    recipe.trained(images, labels)["total"].backward()
    recipe.optimizer.step()
    assert not torch.equal(proxies, before)
    plain = RecognitionModel("convnet", 10, 1, width=4).state_dict()
    assert recipe.model.state_dict().keys() == plain.keys()  # what weights= and exports read: no proxies


def test_a_proxy_loss_refuses_cross_rank_mining_and_a_zero_weight_drops_the_term(tiny_data):
    paths = f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}"
    rng = torch.random.get_rng_state()
    with pytest.raises(ConfigError, match="loss.cross_rank=true .*ProxyAnchorLoss"):
        check_config(compose_train_config(*paths, "loss=ce_proxyanchor", "loss.cross_rank=true", "sampler=pk"))
    assert torch.equal(torch.random.get_rng_state(), rng)  # the stand-in loss drew its proxies off the record
    # a metric loss without parameters: fine
    check_config(compose_train_config(*paths, "loss=ce_triplet", "loss.cross_rank=true", "sampler=pk"))
    # weight 0: no term, no parameters (DDP would wait forever for their gradients)
    assert not list(loss_from_config("ce_proxyanchor", "loss.metric_weight=0").parameters())
    manifest = load_manifest(tiny_data["train"])
    with pytest.raises(ConfigError, match="num_classes=5 but the training shards have 10 classes"):
        check_against_data(compose_train_config(*paths, "loss=ce_proxyanchor", "loss.metric.num_classes=5"), manifest,
                           manifest, None, micro_batches=1, world_size=1)


def test_an_empty_batch_gives_the_losss_parameters_a_zero_gradient():
    """A rank whose batch was all unreadable still gives DDP a gradient for every parameter, or the others wait."""
    loss_fn = loss_from_config("ce_proxyanchor")
    out, _ = batch()
    loss_fn(Output(out.embeddings[:0], out.logits[:0]), torch.zeros(0, dtype=torch.int64))["total"].backward()
    assert torch.equal(loss_fn.metric.proxies.grad, torch.zeros_like(loss_fn.metric.proxies))


@pytest.mark.slow
def test_proxies_are_the_same_on_both_ranks_after_several_steps(tmp_path):
    """2 gloo processes, each starting from its own proxies and training on its own batches (tests/loss_checks.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent}:{HERE}"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(HERE / "loss_checks.py"), str(tmp_path)], check=True, env=env, timeout=120)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(rank0["before"]["proxies"], rank1["before"]["proxies"])  # the check can fail
    assert rank0["steps"] == rank1["steps"] == 6
    assert torch.equal(rank0["proxies"], rank1["proxies"])
    assert not torch.equal(rank0["proxies"], rank0["before"]["proxies"])  # they trained
    assert all(torch.equal(rank0["model"][k], rank1["model"][k]) for k in rank0["model"])
