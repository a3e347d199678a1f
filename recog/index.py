"""A searchable gallery: faiss indexes over a folder of embeddings (recog.embeddings).

    python -m recog.index build EMBEDDINGS OUT_DIR [--kind auto|flat|ivfsq|ivfpq|hnsw] [--shards N]
    python -m recog.index add INDEX_DIR NEW_EMBEDDINGS
    python -m recog.index serve-shard INDEX_DIR --shard I [--host 127.0.0.1] [--port P] [--token T]

Embeddings are unit length, so the inner product is the cosine similarity, and the score identify reports.
`--kind auto` picks an exact flat index for galleries up to FLAT_UP_TO vectors and IVF-SQ8 above (nlist about
4·sqrt(n) lists, a byte per dimension); `ivfpq` takes PQ codes of m bytes (m dividing the width: 8x smaller,
far less accurate) for galleries that would not fit otherwise; `hnsw` is a graph index (fast, all vectors
kept). IVF indexes are trained on a random sample of `--train-size` vectors (or 39 per list, the fewest faiss's
k-means takes without a warning, if that is more); vectors are then added a chunk at a time, so the vectors in
memory are bounded by a chunk, and the index files by a shard.

OUT_DIR holds faiss's own files (`shard-NNNNN.gG.faiss`, `faiss.serialize_index`), one per shard, `ids.gG.npz`
(each id's key and label, in id order), G the version (each build or add writes new files), and `index.json`,
which names them and is replaced last: a reader sees the old index or the new one.
With `--shards N` the ids are split into N contiguous ranges, one index each, every shard a copy of the same
trained index, searched as one through `faiss.IndexShards`; flat and IVF then give exactly the results of one
index (an HNSW graph per shard differs from one graph over all). `add` appends to the last shard.

A gallery larger than one machine's memory: `serve-shard` holds one shard in a process of its own (on any
machine that sees the folder) and answers searches over HTTP with JSON and raw float32/int64 numbers
(recog.shard_server: 127.0.0.1 by default; another address needs a shared token);
`recog.gallery.open_gallery(folder, shard_servers=[(host, port), ...], shard_token=...)` then searches every
shard's server and merges the answers per query, the largest scores first, each shard's ids offset as
IndexShards offsets them: the same results as the local index.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

import recog
from recog.embeddings import Embeddings, open_embeddings
from recog.errors import ConfigError
from recog.files import atomic_write, disk_error, exclusive, write_json
from recog.index_files import FORMAT, INDEX_JSON, IndexInfo, import_faiss, read_ids, read_index_info, read_shard
from recog.shard_server import TOKEN_ENV, port_number, serve_shard
from recog.shell import run_command

KINDS = ("auto", "flat", "ivfsq", "ivfpq", "hnsw")
# Up to this many vectors an exact search costs a few milliseconds per query on one CPU core and holds n×D
# floats (100 MB at D=128); above it IVF-SQ8 holds D bytes per vector and probes a few lists instead of all
# (at 1,000,000 clustered vectors: R@10 1.000, against 0.633 for 16-byte PQ codes; bench/identify.py).
FLAT_UP_TO = 200_000
NPROBE_SHARE = 16  # IVF-PQ probes 1/16 of its lists by default (recall against flat: tests/test_index.py)
HNSW_EF_SEARCH = 64


def pq_bytes(dim: int) -> int:
    """PQ sub-vectors per vector (a byte each): the largest divisor of `dim` up to dim/8, so each sub-quantizer
    covers 8 dimensions or more (faiss's usual choice: 16 bytes at D=128). Narrower sub-vectors code more
    accurately but train far more slowly (4 dimensions: over 10x on a CPU)."""
    return max([m for m in range(1, dim // 8 + 1) if dim % m == 0] or [1])


def choose_kind(kind: str, count: int, dim: int) -> tuple[dict, str]:
    """The index's parameters for `count` vectors, and one line saying what was chosen and why."""
    if kind == "auto":
        kind = "flat" if count <= FLAT_UP_TO else "ivfsq"
        why = f" ({'at most' if kind == 'flat' else 'more than'} {FLAT_UP_TO:,} vectors)"
    else:
        why = ""
    if kind == "flat":
        return {"kind": "flat", "factory": "Flat"}, f"index: exact (flat) for {count:,} vectors{why}"
    if kind == "hnsw":
        params = {"kind": "hnsw", "factory": "HNSW32,Flat", "search": {"efSearch": HNSW_EF_SEARCH}}
        return params, f"index: HNSW (32 links, efSearch {HNSW_EF_SEARCH}) for {count:,} vectors{why}"
    nlist = max(1, min(round(4 * math.sqrt(count)), count // 39))  # faiss's k-means wants ≥ 39 points per list
    if count < 256:  # PQ's 8-bit codebooks need 256 training vectors; SQ8 trains on fewer, but gains nothing there
        why_not = ("to train its codebooks (256 codes each)" if kind == "ivfpq" else
                   "(below that, its lists save nothing over an exact search)")
        raise ConfigError(f"{'IVF-PQ' if kind == 'ivfpq' else 'IVF-SQ8'} needs at least 256 vectors {why_not} and "
                          f"the gallery has {count}; use --kind flat.")
    m, nprobe = pq_bytes(dim), max(1, nlist // NPROBE_SHARE)
    if kind == "ivfsq":  # 8-bit scalar codes: a byte per dimension, near-exact scores
        params = {"kind": "ivfsq", "factory": f"IVF{nlist},SQ8", "nlist": nlist, "search": {"nprobe": nprobe}}
        return params, (f"index: IVF-SQ8, {nlist} lists (nprobe {nprobe}), {dim}-byte codes, for {count:,} "
                        f"vectors{why}")
    # np: no polysemous training (a code reordering for Hamming filtering, which search does not use, and which
    # takes minutes)
    params = {"kind": "ivfpq", "factory": f"IVF{nlist},PQ{m}np", "nlist": nlist, "search": {"nprobe": nprobe}}
    return params, (f"index: IVF-PQ, {nlist} lists (nprobe {nprobe}), {m}-byte codes, for {count:,} vectors{why}")


def new_index(params: dict, dim: int):
    faiss = import_faiss()
    return faiss.index_factory(dim, params["factory"], faiss.METRIC_INNER_PRODUCT)


def shard_ranges(count: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard's ids: contiguous, as equal as can be."""
    bounds = [round(i * count / shards) for i in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def add_range(index, emb: Embeddings, start: int, stop: int, chunk: int) -> None:
    """Add the vectors with ids [start, stop) to `index`, a chunk at a time."""
    for c in emb.chunks(chunk):
        lo, hi = max(start, c.start), min(stop, c.start + len(c.vectors))
        if lo < hi:
            index.add(c.vectors[lo - c.start : hi - c.start])


def ids_of(emb: Embeddings) -> tuple[np.ndarray, np.ndarray]:
    keys, labels = zip(*(emb.keys_labels(part) for part in emb.parts))
    return np.concatenate(keys), np.concatenate(labels)


def write_ids(folder: Path, name: str, keys: np.ndarray, labels: np.ndarray) -> None:
    atomic_write(folder / name, lambda f: np.savez(f, keys=keys, labels=labels))


def write_faiss(index, path: Path) -> None:
    faiss = import_faiss()
    atomic_write(path, lambda f: f.write(faiss.serialize_index(index).tobytes()))


def commit(folder: Path, raw: dict, old: IndexInfo | None) -> IndexInfo:
    """Replace index.json (the switch from the old version's files to the new), then remove the old files that
    the new version does not use: only files an index.json of ours named, each a plain name in `folder`
    (read_index_info refuses any other)."""
    write_json(raw, folder / INDEX_JSON)
    new = IndexInfo(folder, raw)
    for name in set(old.files() if old else ()) - set(new.files()):
        (folder / name).unlink(missing_ok=True)
    return new


def check_out_dir(out_dir: Path, overwrite: bool) -> IndexInfo | None:
    """An index there is replaced only with --overwrite; files of other names are never touched."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give a folder for the index.")
    if not (out_dir / INDEX_JSON).exists():
        return None
    if not overwrite:
        raise ConfigError(f"{out_dir} already holds an index; add to it with `python -m recog.index add`, choose "
                          "another folder, or pass --overwrite to replace it.")
    return read_index_info(out_dir)


def sources_of(emb: Embeddings) -> list[dict]:
    return [dict(s) for s in emb.sources]


def build(embeddings: str | Path, out_dir: str | Path, kind: str = "auto", shards: int = 1,
          train_size: int = 100_000, chunk: int = 65536, overwrite: bool = False, log=print) -> IndexInfo:
    """Build the index of a folder of embeddings in `out_dir` (held for this writer alone while it builds)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    emb = open_embeddings(embeddings)
    if emb.count == 0:
        raise ConfigError(f"the embeddings in {embeddings} hold no vectors; embed a folder of shards with readable "
                          "images first.")
    if not 1 <= shards <= emb.count:
        raise ConfigError(f"--shards {shards} does not fit {emb.count} vectors; give 1 to {emb.count}.")
    params, line = choose_kind(kind, emb.count, emb.dim)
    try:
        with exclusive(out_dir, "index build"):
            old = check_out_dir(out_dir, overwrite)  # again, under the lock: another writer may have finished
            log(line + (f", in {shards} shards" if shards > 1 else ""))
            return _build(emb, out_dir, params, shards, train_size, chunk, old)
    except OSError as e:  # a full disk, a read-only folder: nothing half-written is left (atomic writes)
        raise disk_error(e, out_dir) from None


def _build(emb: Embeddings, out_dir: Path, params: dict, shards: int, train_size: int, chunk: int,
           old: IndexInfo | None) -> IndexInfo:
    empty = new_index(params, emb.dim)
    if not empty.is_trained:
        # faiss's k-means wants at least 39 training points per list: a large gallery's many lists get more
        empty.train(emb.sample(max(train_size, 39 * params.get("nlist", 0))))
    generation = old.raw["generation"] + 1 if old else 0
    names = []
    for number, (start, stop) in enumerate(shard_ranges(emb.count, shards)):
        index = import_faiss().clone_index(empty)  # every shard: the same trained quantizer and codebooks
        add_range(index, emb, start, stop, chunk)
        names.append(f"shard-{number:05d}.g{generation}.faiss")
        write_faiss(index, out_dir / names[-1])
        del index  # one shard in memory at a time
    keys, labels = ids_of(emb)
    write_ids(out_dir, f"ids.g{generation}.npz", keys, labels)
    raw = {"format": FORMAT, "recog_version": recog.__version__, "model_sha256": emb.model_sha256,
           "dim": emb.dim, "count": emb.count, "classes": emb.classes, "metric": "inner_product", "params": params,
           "shards": names, "ids": f"ids.g{generation}.npz", "generation": generation, "sources": sources_of(emb)}
    return commit(out_dir, raw, old)


def add(index_dir: str | Path, embeddings: str | Path, chunk: int = 65536) -> IndexInfo:
    """Append a folder of embeddings (of the same model and classes, and of other items) to the index's last
    shard. One writer at a time: the folder is held while it adds."""
    index_dir = Path(index_dir)
    read_index_info(index_dir)  # an index is there: the lock file is not written into any other folder
    try:
        with exclusive(index_dir, "index add"):
            return _add(read_index_info(index_dir), open_embeddings(embeddings), embeddings, chunk)
    except OSError as e:
        raise disk_error(e, index_dir) from None


def _add(old: IndexInfo, emb: Embeddings, embeddings: str | Path, chunk: int) -> IndexInfo:
    index_dir = old.folder
    if emb.model_sha256 != old.model_sha256:
        raise ConfigError(f"the embeddings in {embeddings} come from another model (sha256 {emb.model_sha256[:12]}) "
                          f"than the index in {index_dir} ({old.model_sha256[:12]}); embed the new images with the "
                          "export the index was built from, or build a new index.")
    if emb.dim != old.dim or emb.classes != old.classes:
        raise ConfigError(f"the embeddings in {embeddings} have other {'widths' if emb.dim != old.dim else 'classes'} "
                          f"than the index in {index_dir}; build a new index from both.")
    if emb.count == 0:
        raise ConfigError(f"the embeddings in {embeddings} hold no vectors; there is nothing to add.")
    new_keys, new_labels = ids_of(emb)
    old_keys, old_labels = read_ids(old)
    # one item, one key: a gallery must never hold an item twice (the same embeddings added again, or shards
    # written again into a folder whose items it holds)
    twice = np.intersect1d(old_keys, new_keys)
    if len(twice) or len(np.unique(new_keys)) != len(new_keys):
        first = twice[0] if len(twice) else new_keys[0]
        raise ConfigError(f"the embeddings in {embeddings} hold items the index in {index_dir} already holds "
                          f"({len(twice) or 'some'} key(s), first {str(first)!r}); add only embeddings of new items "
                          "(new shard folders), or build the index again.")
    folder, generation = old.folder, old.raw["generation"] + 1
    last = read_shard(folder / old.raw["shards"][-1])
    add_range(last, emb, 0, emb.count, chunk)
    last_name = f"shard-{len(old.raw['shards']) - 1:05d}.g{generation}.faiss"
    write_faiss(last, folder / last_name)
    keys, labels = np.concatenate([old_keys, new_keys]), np.concatenate([old_labels, new_labels])
    write_ids(folder, f"ids.g{generation}.npz", keys, labels)
    sources = old.sources + [s for s in sources_of(emb) if s not in old.sources]
    raw = {**old.raw, "count": old.count + emb.count, "shards": [*old.raw["shards"][:-1], last_name],
           "ids": f"ids.g{generation}.npz", "generation": generation, "sources": sources}
    return commit(folder, raw, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recog.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build an index from a folder of embeddings")
    b.add_argument("embeddings")
    b.add_argument("out_dir")
    b.add_argument("--kind", choices=KINDS, default="auto")
    b.add_argument("--shards", type=int, default=1, help="split the ids into this many indexes (1)")
    b.add_argument("--train-size", type=int, default=100_000,
                   help=f"IVF indexes (ivfsq, ivfpq; auto above {FLAT_UP_TO:,} vectors) train on a sample of this "
                        "many vectors (at least 39 per list); flat and hnsw need no training")
    b.add_argument("--overwrite", action="store_true", help="replace an index already in OUT_DIR")
    a = commands.add_parser("add", help="add a folder of embeddings of the same model to an index")
    a.add_argument("index_dir")
    a.add_argument("embeddings")
    s = commands.add_parser("serve-shard", help="hold one shard of an index and answer searches (recog.serve "
                                                "--shard-servers)")
    s.add_argument("index_dir")
    s.add_argument("--shard", type=int, required=True, help="which shard (from 0)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1; any other needs --token or RECOG_SHARD_TOKEN)")
    s.add_argument("--port", type=port_number, default=0, help="0: any free port (printed)")
    s.add_argument("--token", help="the shared token every request must carry (default: $RECOG_SHARD_TOKEN; the "
                                   "environment keeps it out of the process list)")
    return run_command(lambda: run(parser.parse_args(argv)))


def run(args: argparse.Namespace) -> None:
    if args.command == "serve-shard":
        serve_shard(args.index_dir, args.shard, args.host, args.port, args.token or os.environ.get(TOKEN_ENV),
                    log=lambda line: print(line, flush=True))
        return
    if args.command == "build":
        info = build(args.embeddings, args.out_dir, args.kind, args.shards, args.train_size, overwrite=args.overwrite)
    else:
        info = add(args.index_dir, args.embeddings)
    print(f"{info.folder}: {info.count:,} {info.dim}-d vectors, {info.raw['params']['factory']}, "
          f"{len(info.raw['shards'])} shard(s)")


if __name__ == "__main__":
    sys.exit(main())
