"""Retrieval metrics: Recall@k and MAP@R of query embeddings against a gallery. Tensors in, numbers out.

Recall@k: the share of queries with at least one image of their class among
their k nearest gallery items. MAP@R (Musgrave et al., 2020): with R the number
of gallery items of the query's class, the mean over queries of
(1/R) · Σ_{i≤R} precision@i · [item i is of the query's class].
Similarities are computed a chunk of queries at a time, so memory is bounded
by chunk × gallery size, not by queries × gallery; the figures are sums over
queries, so ranks can each search their own slice of the queries and add them
up (one all-reduce).
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)
VOTE_K = 5  # neighbours in the class vote, as recog.identify's default -k


@torch.no_grad()
def retrieval_sums(queries: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                   gallery_labels: torch.Tensor, *, query_offset: int | None = None, ks=KS, vote_k: int = VOTE_K,
                   chunk: int = 1024) -> torch.Tensor:
    """Sums over these queries, which add up across disjoint query slices (ranks): hits at each k, the sum of
    average precisions at R, the queries counted in MAP@R (R > 0), the queries whose k-NN vote is right, and
    the queries; float64. The vote is recog.identify's: the label with the largest summed similarity over the
    `vote_k` nearest gallery items.

    Embeddings are compared by dot product (cosine for unit-length embeddings). `query_offset`: the queries
    are rows query_offset, query_offset + 1, ... of the gallery, each left out of its own search
    (leave-one-out: each test image queried against the rest).
    """
    leave_one_out = query_offset is not None
    num_classes = int(max(query_labels.max(), gallery_labels.max())) + 1 if len(query_labels) else 1
    class_sizes = torch.bincount(gallery_labels, minlength=num_classes)
    r_all = class_sizes[query_labels] - (1 if leave_one_out else 0)  # relevant gallery items per query
    searchable = len(gallery) - (1 if leave_one_out else 0)
    sums = torch.zeros(len(ks) + 4, dtype=torch.float64)
    if not len(queries) or searchable <= 0:
        sums[-1] = len(queries)
        return sums
    depth = min(max(max(ks), vote_k, int(r_all.max())), searchable)
    ranks = torch.arange(1, depth + 1, device=queries.device, dtype=torch.float32)
    for start in range(0, len(queries), chunk):
        q, labels, r = queries[start : start + chunk], query_labels[start : start + chunk], r_all[start : start + chunk]
        sims = q @ gallery.t()
        if leave_one_out:
            rows = torch.arange(len(q), device=q.device)
            sims[rows, rows + query_offset + start] = float("-inf")
        scores, nearest = sims.topk(depth, dim=1)
        relevant = (gallery_labels[nearest] == labels[:, None]).float()  # (n, depth)
        for i, k in enumerate(ks):
            sums[i] += relevant[:, :k].amax(dim=1).sum().item()
        precision = relevant.cumsum(dim=1) / ranks
        ap = (precision * relevant * (ranks[None, :] <= r[:, None])).sum(dim=1) / r.clamp(min=1)
        valid = r > 0  # a query alone in its class has nothing to find: left out of MAP@R
        sums[len(ks)] += ap[valid].double().sum().item()
        sums[len(ks) + 1] += int(valid.sum())
        votes = torch.zeros(len(q), num_classes, device=q.device, dtype=scores.dtype)
        votes.scatter_add_(1, gallery_labels[nearest[:, :vote_k]], scores[:, :vote_k])
        sums[len(ks) + 2] += int((votes.argmax(dim=1) == labels).sum())
    sums[-1] = len(queries)
    return sums


def undefined(sums: torch.Tensor, ks=KS) -> str | None:
    """Why the metrics of `retrieval_sums` are undefined, or None: no query has an image of its class in the
    gallery to find (a single test image left out of its own search, or every class a single image), so a recall
    of 0 would say the model failed where there was nothing to succeed at."""
    queries, findable = int(sums[-1]), int(sums[len(ks) + 1])
    if findable:
        return None
    return (f"retrieval metrics are undefined: none of the {queries} queries has an image of its class in the "
            "gallery to find (leave-one-out needs two test images of a class or more)")


def metrics_from_sums(sums: torch.Tensor, ks=KS) -> dict[str, float]:
    """Recall@k and MAP@R from `retrieval_sums` (added up over every query slice); NaN where `undefined`."""
    if undefined(sums, ks):
        return dict.fromkeys([*(f"recall@{k}" for k in ks), "map@r", "vote_top1"], float("nan"))
    sums = sums.tolist()
    queries = max(sums[-1], 1)
    metrics = {f"recall@{k}": sums[i] / queries for i, k in enumerate(ks)}
    metrics["map@r"] = sums[len(ks)] / max(sums[len(ks) + 1], 1)
    metrics["vote_top1"] = sums[len(ks) + 2] / queries
    return metrics


def retrieval_metrics(queries: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor | None = None,
                      gallery_labels: torch.Tensor | None = None, ks=KS, chunk: int = 1024) -> dict[str, float]:
    """All queries in one process. Without a gallery, every query is searched against all the other queries
    (itself excluded): "each test image queried against the rest"."""
    if gallery is None:
        sums = retrieval_sums(queries, query_labels, queries, query_labels, query_offset=0, ks=ks, chunk=chunk)
    else:
        sums = retrieval_sums(queries, query_labels, gallery, gallery_labels, ks=ks, chunk=chunk)
    return metrics_from_sums(sums, ks)
