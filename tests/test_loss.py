"""Losses: cross-entropy alone, and with a mined metric-learning term composed from the real configs."""

import pytest
import torch
from hydra import compose, initialize
from hydra.utils import instantiate

from recog.loss import RecognitionLoss
from recog.model import Output


def batch():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(12, 8), dim=1).requires_grad_(True)
    labels = torch.arange(12) % 3
    return Output(emb, emb @ torch.nn.functional.normalize(torch.randn(3, 8), dim=1).t() * 16), labels


def test_cross_entropy_alone():
    out, labels = batch()
    terms = RecognitionLoss()(out, labels)
    assert set(terms) == {"ce", "total"}
    assert torch.allclose(terms["total"], torch.nn.functional.cross_entropy(out.logits, labels))


@pytest.mark.parametrize("name", ["ce_triplet", "ce_multisimilarity"])
def test_metric_term_from_config(name):
    with initialize(version_base="1.3", config_path="../conf/loss"):
        loss_fn = instantiate(compose(config_name=name))
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
    overrides = ["metric.miner._target_=pytorch_metric_learning.miners.TripletMarginMiner",
                 "+metric.miner.type_of_triplets=semihard", "+metric.miner.margin=0.2"]
    with initialize(version_base="1.3", config_path="../conf/loss"):
        loss_fn = instantiate(compose(config_name="ce_triplet", overrides=overrides))
    assert loss_fn.metric.miner.type_of_triplets == "semihard"
    out, labels = batch()
    assert torch.isfinite(loss_fn(out, labels)["total"])
