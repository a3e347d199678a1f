"""Retrieval metrics of query embeddings against a gallery, from two folders that `recog.embed` wrote.

    python -m recog.evaluate QUERIES [GALLERY] [--chunk N]
    torchrun --nproc_per_node=8 -m recog.evaluate QUERIES GALLERY

Each rank searches only its own slice of the queries (a contiguous, unpadded share: each query once)
against the whole gallery, a chunk of queries at a time: the work is divided by the world size, and a
rank's memory is the gallery plus chunk × gallery similarities. The per-query sums are added up over the
ranks in one all-reduce; rank 0 prints Recall@1/5/10 and MAP@R as one JSON object. Without GALLERY, each
query is searched against the other queries (leave-one-out), as training's evaluation does by default.
A gallery larger than memory is for a faiss index instead (python -m recog.index).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from recog import dist
from recog.embeddings import Embeddings, open_embeddings
from recog.errors import ConfigError
from recog.retrieval import metrics_from_sums, retrieval_sums, undefined
from recog.shell import run_command


def rows(emb: Embeddings, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors (float32) and labels of rows lo..hi of a folder of embeddings, read part by part."""
    vectors, labels, start = [], [], 0
    for part in emb.parts:
        a, b = max(lo, start), min(hi, start + part["count"])
        if a < b:
            vectors.append(np.asarray(emb.vectors(part)[a - start : b - start], dtype=np.float32))
            labels.append(emb.keys_labels(part)[1][a - start : b - start])
        start += part["count"]
    if not vectors:
        return torch.zeros(0, emb.dim), torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(vectors)), torch.from_numpy(np.concatenate(labels).astype(np.int64))


def check_pair(queries: Embeddings, gallery: Embeddings) -> None:
    if queries.model_sha256 != gallery.model_sha256:
        raise ConfigError(f"{queries.folder} and {gallery.folder} were embedded by different models; embed both "
                          "with the same export.")
    if queries.classes and gallery.classes and queries.classes != gallery.classes:
        raise ConfigError(f"{queries.folder} and {gallery.folder} name different classes; embed both from shards "
                          "written with the same classes.")


def evaluate(query_dir: str, gallery_dir: str | None, rank: int, world_size: int, chunk: int = 1024) -> torch.Tensor:
    """This rank's sums (see retrieval_sums) for its slice of the queries. Reads only; raises ConfigError."""
    queries = open_embeddings(query_dir)
    gallery = open_embeddings(gallery_dir) if gallery_dir else queries
    check_pair(queries, gallery)
    lo, hi = queries.count * rank // world_size, queries.count * (rank + 1) // world_size
    q, q_labels = rows(queries, lo, hi)
    g, g_labels = rows(gallery, 0, gallery.count)
    if (q_labels < 0).any() or (g_labels < 0).any():
        raise ConfigError("some embeddings have no label (-1); retrieval metrics need labelled queries and gallery.")
    return retrieval_sums(q, q_labels, g, g_labels, query_offset=None if gallery_dir else lo, chunk=chunk)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recog.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("queries", help="a folder of embeddings (python -m recog.embed)")
    p.add_argument("gallery", nargs="?", help="another folder of embeddings (default: leave-one-out on queries)")
    p.add_argument("--chunk", type=int, default=1024, help="queries searched at a time (memory: chunk x gallery)")
    args = p.parse_args(argv)
    return run_command(lambda: evaluate_on_ranks(args.queries, args.gallery, args.chunk))


def evaluate_on_ranks(queries: str, gallery: str | None, chunk: int) -> None:
    ctx = dist.setup(backend="gloo")  # tensors stay on the CPU: gloo all-reduces them
    try:
        sums = dist.fail_together(lambda: evaluate(queries, gallery, ctx.rank, ctx.world_size, chunk), ctx,
                                  "evaluating")
        total = dist.all_reduce_sum(sums)  # its last entry: the queries searched, over all ranks
        if undefined(total):
            raise ConfigError(f"{undefined(total)}; give more labelled embeddings.")
        if ctx.is_main:
            print(json.dumps({"queries": int(total[-1]), **metrics_from_sums(total)}))
    finally:
        dist.teardown()


if __name__ == "__main__":
    sys.exit(main())
