"""Retrieval metrics: Recall@k and MAP@R of query embeddings against a gallery. Tensors in, numbers out.

Recall@k: the share of queries with at least one image of their class among
their k nearest gallery items. MAP@R (Musgrave et al., 2020): with R the number
of gallery items of the query's class, the mean over queries of
(1/R) · Σ_{i≤R} precision@i · [item i is of the query's class].
Similarities are computed a chunk of queries at a time, so memory is bounded
by chunk × gallery size, not by queries × gallery.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def retrieval_metrics(queries: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor | None = None,
                      gallery_labels: torch.Tensor | None = None, ks=(1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Embeddings are compared by dot product (cosine for unit-length embeddings).

    Without a gallery, every query is searched against all the other queries
    (itself excluded): "each test image queried against the rest".
    """
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = queries, query_labels
    class_sizes = torch.bincount(gallery_labels, minlength=int(max(query_labels.max(), gallery_labels.max())) + 1)
    r_all = class_sizes[query_labels] - (1 if leave_one_out else 0)  # relevant items per query
    depth = min(max(max(ks), int(r_all.max())), len(gallery) - (1 if leave_one_out else 0))
    hits = {k: 0.0 for k in ks}
    map_sum, counted = 0.0, 0
    for start in range(0, len(queries), chunk):
        q, labels, r = queries[start : start + chunk], query_labels[start : start + chunk], r_all[start : start + chunk]
        sims = q @ gallery.t()
        if leave_one_out:
            rows = torch.arange(len(q), device=q.device)
            sims[rows, rows + start] = float("-inf")
        nearest = sims.topk(depth, dim=1).indices
        relevant = (gallery_labels[nearest] == labels[:, None]).float()  # (n, depth)
        for k in ks:
            hits[k] += relevant[:, :k].amax(dim=1).sum().item()
        ranks = torch.arange(1, depth + 1, device=q.device, dtype=torch.float32)
        within_r = ranks[None, :] <= r[:, None]
        precision = relevant.cumsum(dim=1) / ranks
        ap = (precision * relevant * within_r).sum(dim=1) / r.clamp(min=1)
        valid = r > 0  # a query alone in its class has nothing to find: left out of MAP@R
        map_sum += ap[valid].sum().item()
        counted += int(valid.sum())
    n = len(queries)
    metrics = {f"recall@{k}": hits[k] / n for k in ks}
    metrics["map@r"] = map_sum / max(counted, 1)
    return metrics
