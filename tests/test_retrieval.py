"""Retrieval metrics against values computed by hand on tiny cases."""

import pytest
import torch

from recog.retrieval import retrieval_metrics


def unit(angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float32) * torch.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_leave_one_out_by_hand():
    # points on a circle; labels A A A B B
    emb = unit([0, 10, 100, 20, 200])
    labels = torch.tensor([0, 0, 0, 1, 1])
    m = retrieval_metrics(emb, labels, ks=(1, 2))
    # nearest neighbours (self excluded): 0->10°(A) ; 10->0°(A) ; 100->20°(B) ; 20->10°(A) ; 200->100°(A)
    assert m["recall@1"] == pytest.approx(2 / 5)
    # within 2: 0:{10,20}→A ✓; 10:{0,20}→✓; 100:{20,10}→A ✓; 20:{10,0}→✗; 200:{100,...}→ 100°(A), then 20°? ✗
    assert m["recall@2"] == pytest.approx(3 / 5)
    # MAP@R: R = 2 for A queries, 1 for B queries
    # q0: ranked 10(A) 20(B): AP = (1/1)/2 = 0.5 ; q10: 0(A), 20(B): 0.5 ; q100: 20(B), 10(A): (1/2)/2 = 0.25
    # q20 (B, R=1): 10(A): 0 ; q200 (B, R=1): 100(A): 0
    assert m["map@r"] == pytest.approx((0.5 + 0.5 + 0.25 + 0 + 0) / 5)


def test_separate_gallery_and_chunking_agree():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 8), dim=1)
    g = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    ql, gl = torch.randint(0, 4, (37,)), torch.randint(0, 4, (50,))
    whole = retrieval_metrics(q, ql, g, gl, chunk=1000)
    assert whole == pytest.approx(retrieval_metrics(q, ql, g, gl, chunk=5))
    perfect = retrieval_metrics(g, gl, g, gl)  # each query is in the gallery: its own nearest neighbour
    assert perfect["recall@1"] == 1.0
