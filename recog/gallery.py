"""An index opened for search: its shards read here (recog.index_files), or searched by their serve-shard processes
(recog.shard_server's client), as one index either way. What recog.identify and recog.serve search.

A gallery is one generation of the index (`gallery.info.generation`), read whole even while `recog.index add`
commits the next one (recog.index_files.read_generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recog.errors import ConfigError
from recog.index_files import INDEX_JSON, IndexInfo, import_faiss, open_shard, read_generation, read_ids
from recog.shard_server import RemoteShards


@dataclass
class Gallery:
    """An index opened for search: `search` gives each query's top-k (scores, ids); ids index `keys`/`labels`;
    `info`: the index.json read (its generation, classes, model sha256)."""

    info: IndexInfo
    index: object
    keys: np.ndarray
    labels: np.ndarray

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def open_gallery(folder: str | Path, shard_servers: list[tuple[str, int]] | None = None,
                 shard_token: str | None = None) -> Gallery:
    """The index in `folder`, ready to search: its shards opened here, or searched by their `serve-shard`
    processes at `shard_servers` (one address per shard, in shard order; `shard_token` if they want one)."""
    return read_generation(folder, lambda info: open_generation(info, shard_servers, shard_token))


def open_generation(info: IndexInfo, shard_servers: list[tuple[str, int]] | None, shard_token: str | None) -> Gallery:
    """The generation `info` describes (an index.json read earlier): a file of it that is gone is FileGone, on which
    open_gallery reads index.json again."""
    faiss = import_faiss()
    if shard_servers:
        index = RemoteShards(info, shard_servers, shard_token)
    elif len(info.raw["shards"]) == 1:
        index = open_shard(info, 0)
    else:  # successive ids: shard i's local ids are offset by the sizes of the shards before it
        index = faiss.IndexShards(info.dim, False, True)
        for number in range(len(info.raw["shards"])):
            index.add_shard(open_shard(info, number))
    keys, labels = read_ids(info)
    if not index.ntotal == len(keys) == info.count:
        raise ConfigError(f"the index in {info.folder} holds {index.ntotal} vectors and {len(keys)} ids where "
                          f"{INDEX_JSON} says {info.count}; build the index again.")
    return Gallery(info, index, keys, labels)
