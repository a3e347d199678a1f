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


def clustered(n: int, classes: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors around one centre per class, noisy enough that neighbours are often of other classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g)
    return torch.nn.functional.normalize(centres[labels] + 1.2 * torch.randn(n, dim, generator=g), dim=1), labels


def test_query_slices_add_up_to_the_whole_and_agree_with_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from recog.retrieval import metrics_from_sums, retrieval_sums

    queries, q_labels = clustered(301, 7, seed=1)
    gallery, g_labels = clustered(1000, 7, seed=2)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    for leave_one_out in (False, True):
        g, gl = (queries, q_labels) if leave_one_out else (gallery, g_labels)
        whole = retrieval_metrics(queries, q_labels) if leave_one_out else retrieval_metrics(queries, q_labels, g, gl)
        # three uneven slices of the queries, as three ranks would search them, chunked differently
        bounds = [0, 50, 51, 301]
        sums = sum(retrieval_sums(queries[a:b], q_labels[a:b], g, gl, query_offset=a if leave_one_out else None,
                                  chunk=17) for a, b in zip(bounds, bounds[1:]))
        assert metrics_from_sums(sums) == pytest.approx(whole, abs=1e-12)
        theirs = calc.get_accuracy(queries, q_labels, g, gl, ref_includes_query=leave_one_out)
        assert whole["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
        assert whole["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
        assert 0.2 < whole["recall@1"] < 0.9  # neither trivial nor hopeless: the comparison means something


def test_vote_top1_is_recog_identify_s_vote():
    from recog.identify import vote

    queries, q_labels = clustered(200, 7, seed=3)
    gallery, g_labels = clustered(500, 7, seed=4)
    scores, nearest = (queries @ gallery.t()).topk(5, dim=1)
    voted = [vote(g_labels[n].tolist(), s.tolist()) for n, s in zip(nearest, scores)]
    want = sum(v == label for v, label in zip(voted, q_labels.tolist())) / len(queries)
    got = retrieval_metrics(queries, q_labels, gallery, g_labels)["vote_top1"]
    assert got == pytest.approx(want, abs=1e-12) and got != retrieval_metrics(queries, q_labels, gallery,
                                                                               g_labels)["recall@1"]


def test_nothing_to_find_is_undefined_not_a_recall_of_zero():
    """One test image left out of its own search (or every class a single image) has nothing to find: its
    metrics are NaN, with the reason, never 0.0 (which would say the model failed)."""
    import math

    from recog.retrieval import retrieval_sums, undefined

    for emb, labels in ((unit([0]), torch.tensor([0])), (unit([0, 90, 180]), torch.tensor([0, 1, 2]))):
        assert all(math.isnan(v) for v in retrieval_metrics(emb, labels).values())
        reason = undefined(retrieval_sums(emb, labels, emb, labels, query_offset=0))
        assert reason and f"none of the {len(labels)} queries has an image of its class" in reason
    defined = retrieval_metrics(unit([0, 10, 180]), torch.tensor([0, 0, 1]))  # the lone query counts as a miss
    assert defined["recall@1"] == pytest.approx(2 / 3) and defined["map@r"] == 1.0
