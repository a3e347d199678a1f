"""A searchable gallery: faiss indexes over a folder of embeddings (recog.embeddings).

    python -m recog.index build EMBEDDINGS OUT_DIR [--kind auto|flat|ivfsq|ivfpq|hnsw] [--shards N | --shard-size N]
    python -m recog.index add INDEX_DIR NEW_EMBEDDINGS [--duplicates refuse|skip]
    python -m recog.index serve-shard INDEX_DIR --shard I [--host 127.0.0.1] [--port P] [--token T]

Embeddings are unit length, so the inner product is the cosine similarity, and the score identify reports.
`--kind auto` picks an exact flat index for galleries up to FLAT_UP_TO vectors and IVF-SQ8 above (nlist about
4·sqrt(n) lists, a byte per dimension); `ivfpq` takes PQ codes of m bytes (m dividing the width: 8x smaller,
far less accurate) for galleries that would not fit otherwise; `hnsw` is a graph index (fast, all vectors
kept). IVF indexes are trained on a random sample of `--train-size` vectors (or 39 per list, the fewest faiss's
k-means takes without a warning, if that is more); vectors are then added a chunk at a time, so the vectors in
memory are bounded by a chunk, and the index files by a shard.

OUT_DIR holds faiss's own files (`shard-NNNNN.gG.faiss`, `faiss.serialize_index`), one per shard, `ids.gG.npz`
(each id's key and label, in id order), G the generation (each build or add writes the files it changes under
new names), and `index.json`, which names them and is replaced last: a reader sees the old generation or the new
one, whole. The previous generation's files stay until the next build or add (a reader that read index.json just
before the switch still opens them); a writer killed half-way leaves index.json and its files as they were, and
the next writer removes what it left.
The ids are split into contiguous shards of at most the shard size (`--shard-size`, default 10,000,000 vectors;
with `--shards N`, N equal shards of ceil(count / N)), every shard a copy of the same trained index, searched as
one through `faiss.IndexShards`; flat and IVF then give exactly the results of one index (an HNSW graph per
shard differs from one graph over all).

`add` appends embeddings of new items from the same model: their new classes join the index's class list by
name (old labels unchanged), the last shard is filled up to the shard size and further vectors start new shards
(the last shard emptied: the same trained quantizer and codes), and only the shards that changed are written.
A key the index holds already is refused by default, in one sentence with nothing written (the same folder added
twice is a mistake that a silent skip would hide); `--duplicates skip` keeps the index's item, prints the count
and adds the rest. A grown IVF index keeps the lists it was trained with, and probes as many of them as a fresh
build of its size would; IVF-SQ8's code ranges keep a margin (SQ_MARGIN) for vectors beyond the training sample's.

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
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import recog
from recog.embeddings import Embeddings, open_embeddings
from recog.errors import ConfigError
from recog.files import atomic_write, disk_error, exclusive, write_json
from recog.index_files import (
    DEFAULT_SHARD_SIZE,
    FORMAT,
    INDEX_JSON,
    IndexInfo,
    import_faiss,
    read_ids,
    read_index_info,
    read_shard,
)
from recog.shard_server import TOKEN_ENV, port_number, serve_shard
from recog.shell import run_command

KINDS = ("auto", "flat", "ivfsq", "ivfpq", "hnsw")
# Up to this many vectors an exact search costs a few milliseconds per query on one CPU core and holds n×D
# floats (100 MB at D=128); above it IVF-SQ8 holds D bytes per vector and probes a few lists instead of all
# (at 1,000,000 clustered vectors: R@10 1.000, against 0.633 for 16-byte PQ codes; bench/identify.py).
FLAT_UP_TO = 200_000
NPROBE_SHARE = 16  # IVF-PQ probes 1/16 of its lists by default (recall against flat: tests/test_index.py)
HNSW_EF_SEARCH = 64
# IVF-SQ8's codes cover each dimension's range in the training sample widened by this share of it on both sides
# (faiss's rangestat_arg): vectors added later, of new classes, fall outside the sample's range and would be
# clipped. Measured on Fashion-MNIST grown by 3 new classes (tests/test_index_growth.py), every list probed:
# 10-recall@10 0.947 without a margin, 0.966 with 0.2 (a fresh build of both: 0.976 and 0.966).
SQ_MARGIN = 0.2
DUPLICATES = ("refuse", "skip")  # what `add` does with a key the index holds already (refuse: the default)


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
        params = {"kind": "ivfsq", "factory": f"IVF{nlist},SQ8", "nlist": nlist, "sq_margin": SQ_MARGIN,
                  "search": {"nprobe": nprobe}}
        return params, (f"index: IVF-SQ8, {nlist} lists (nprobe {nprobe}), {dim}-byte codes, for {count:,} "
                        f"vectors{why}")
    # np: no polysemous training (a code reordering for Hamming filtering, which search does not use, and which
    # takes minutes)
    params = {"kind": "ivfpq", "factory": f"IVF{nlist},PQ{m}np", "nlist": nlist, "search": {"nprobe": nprobe}}
    return params, (f"index: IVF-PQ, {nlist} lists (nprobe {nprobe}), {m}-byte codes, for {count:,} vectors{why}")


def new_index(params: dict, dim: int):
    faiss = import_faiss()
    index = faiss.index_factory(dim, params["factory"], faiss.METRIC_INNER_PRODUCT)
    if "sq_margin" in params:
        faiss.downcast_index(index).sq.rangestat_arg = params["sq_margin"]
    return index


def grown_params(params: dict, count: int, dim: int) -> dict:
    """The parameters of an IVF index grown by `add` to `count` vectors: its lists stay those trained at build time
    (fewer and larger than a fresh build's, and placed for the old items), so it probes at least as many lists as
    a fresh build of `count` vectors would (choose_kind): a fresh build's recall, for more vectors scanned per
    query (tests/test_index_growth.py)."""
    if "nprobe" not in params.get("search", {}):
        return params
    fresh = choose_kind(params["kind"], count, dim)[0]["search"]["nprobe"]
    nprobe = min(params["nlist"], max(params["search"]["nprobe"], fresh))
    return {**params, "search": {**params["search"], "nprobe": nprobe}}


def shard_ranges(count: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard's ids: contiguous, as equal as can be."""
    bounds = [round(i * count / shards) for i in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def shard_layout(count: int, shards: int | None, shard_size: int | None) -> tuple[list[tuple[int, int]], int]:
    """The ids' ranges, one per shard, and the index's shard size: `shard_size` vectors per shard (the last one
    partly filled); or `shards` equal shards and their size, ceil(count / shards); or DEFAULT_SHARD_SIZE."""
    if shards is not None and shard_size is not None:
        raise ConfigError("--shards and --shard-size both set the shards' size; give one of them.")
    if shards is not None:
        if not 1 <= shards <= count:
            raise ConfigError(f"--shards {shards} does not fit {count} vectors; give 1 to {count}.")
        return shard_ranges(count, shards), math.ceil(count / shards)
    size = DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    if size < 1:
        raise ConfigError(f"--shard-size {size} holds no vectors; give 1 or more.")
    return [(lo, min(lo + size, count)) for lo in range(0, count, size)], size


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


# The files build and add write in an index folder: a shard's and the ids' of generation G, and atomic_write's
# temporary file of either or of index.json (left by a writer killed while it wrote)
OUR_NAME = r"(?:shard-\d{5,}\.g\d+\.faiss|ids\.g\d+\.npz)"
OURS = re.compile(rf"{OUR_NAME}|\.(?:{OUR_NAME}|index\.json)\.tmp-\d+")


def remove_leftovers(folder: Path, current: IndexInfo | None) -> None:
    """Before a writer writes, under the folder's lock: remove what a killed writer left (files of ours that
    index.json names neither as its generation's nor as the previous one's), so that no run leaves disk behind.
    Only names of OURS: files of other names are never touched. With no index.json (a first build) only
    temporary files are removed; a whole shard or ids file is refused, as it may be an index set aside."""
    keep = set(current.files() + current.retired()) if current else set()
    for path in folder.iterdir():
        if OURS.fullmatch(path.name) and path.name not in keep and path.is_file():
            if current is None and not path.name.startswith("."):  # no index.json says whose it is: not removed
                raise ConfigError(f"{folder} holds {path.name}, an index file that no index.json there names (a "
                                  "build killed before it finished, or an index.json moved away); move the index "
                                  "files away or delete them, or build into another folder.")
            path.unlink(missing_ok=True)


def commit(folder: Path, raw: dict, old: IndexInfo | None) -> IndexInfo:
    """Replace index.json (the switch from the old generation's files to the new), then remove the files the
    generation before the old one used and neither uses: a reader that read the old index.json a moment ago
    still finds every file it names. Only files an index.json of ours named, each a plain name in `folder`
    (read_index_info refuses any other)."""
    previous = set(old.files()) if old else set()
    raw = {**raw, "retired": sorted(previous - set(raw["shards"]) - {raw["ids"]})}
    write_json(raw, folder / INDEX_JSON)
    new = IndexInfo(folder, raw)
    for name in set(old.retired() if old else ()) - set(new.files()) - previous:
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


def build(embeddings: str | Path, out_dir: str | Path, kind: str = "auto", shards: int | None = None,
          train_size: int = 100_000, chunk: int = 65536, overwrite: bool = False, shard_size: int | None = None,
          log=print) -> IndexInfo:
    """Build the index of a folder of embeddings in `out_dir` (held for this writer alone while it builds):
    `shards` equal shards, or shards of `shard_size` vectors (default DEFAULT_SHARD_SIZE), which `add` keeps."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    emb = open_embeddings(embeddings)
    if emb.count == 0:
        raise ConfigError(f"the embeddings in {embeddings} hold no vectors; embed a folder of shards with readable "
                          "images first.")
    ranges, size = shard_layout(emb.count, shards, shard_size)
    params, line = choose_kind(kind, emb.count, emb.dim)
    try:
        with exclusive(out_dir, "index build"):
            old = check_out_dir(out_dir, overwrite)  # again, under the lock: another writer may have finished
            log(line + (f", in {len(ranges)} shards of up to {size:,}" if len(ranges) > 1 else ""))
            remove_leftovers(out_dir, old)
            return _build(emb, out_dir, params, ranges, size, train_size, chunk, old)
    except OSError as e:  # a full disk, a read-only folder: nothing half-written is left (atomic writes)
        raise disk_error(e, out_dir) from None


def _build(emb: Embeddings, out_dir: Path, params: dict, ranges: list[tuple[int, int]], size: int,
           train_size: int, chunk: int, old: IndexInfo | None) -> IndexInfo:
    empty = new_index(params, emb.dim)
    if not empty.is_trained:
        # faiss's k-means wants at least 39 training points per list: a large gallery's many lists get more
        empty.train(emb.sample(max(train_size, 39 * params.get("nlist", 0))))
    generation = old.generation + 1 if old else 0
    names = []
    for number, (start, stop) in enumerate(ranges):
        index = import_faiss().clone_index(empty)  # every shard: the same trained quantizer and codebooks
        add_range(index, emb, start, stop, chunk)
        names.append(f"shard-{number:05d}.g{generation}.faiss")
        write_faiss(index, out_dir / names[-1])
        del index  # one shard in memory at a time
    keys, labels = ids_of(emb)
    write_ids(out_dir, f"ids.g{generation}.npz", keys, labels)
    raw = {"format": FORMAT, "recog_version": recog.__version__, "model_sha256": emb.model_sha256,
           "dim": emb.dim, "count": emb.count, "classes": emb.classes, "metric": "inner_product", "params": params,
           "shards": names, "shard_size": size, "shard_counts": [stop - start for start, stop in ranges],
           "ids": f"ids.g{generation}.npz", "generation": generation, "sources": sources_of(emb)}
    return commit(out_dir, raw, old)


def add(index_dir: str | Path, embeddings: str | Path, duplicates: str = "refuse", chunk: int = 65536,
        log=print) -> IndexInfo:
    """Add a folder of embeddings of the same model (and of other items; its new classes join the index's by
    name) as the index's next generation: the last shard filled up to the shard size, then new shards. A key the
    index holds already (or twice in the embeddings) is refused (`duplicates="refuse"`) or skipped ("skip").
    One writer at a time: the folder is held while it adds."""
    index_dir = Path(index_dir)
    if duplicates not in DUPLICATES:
        raise ConfigError(f"duplicates={duplicates!r} is not one of {', '.join(DUPLICATES)}; give one of them.")
    read_index_info(index_dir)  # an index is there: the lock file is not written into any other folder
    try:
        with exclusive(index_dir, "index add"):
            return _add(read_index_info(index_dir), open_embeddings(embeddings), embeddings, duplicates, chunk, log)
    except OSError as e:
        raise disk_error(e, index_dir) from None


def check_same_model(old: IndexInfo, emb: Embeddings, embeddings: str | Path) -> None:
    if emb.model_sha256 != old.model_sha256:
        raise ConfigError(f"the embeddings in {embeddings} come from another model (sha256 {emb.model_sha256[:12]}) "
                          f"than the index in {old.folder} ({old.model_sha256[:12]}); embed the new images with the "
                          "export the index was built from, or build a new index.")
    if emb.dim != old.dim:
        raise ConfigError(f"the embeddings in {embeddings} have other widths than the index in {old.folder}; build "
                          "a new index from both.")
    if emb.count == 0:
        raise ConfigError(f"the embeddings in {embeddings} hold no vectors; there is nothing to add.")


def joined_classes(old: IndexInfo, emb: Embeddings, labels: np.ndarray, embeddings: str | Path
                   ) -> tuple[list[str], np.ndarray]:
    """The index's classes grown by the embeddings' new names (in the embeddings' order; old labels unchanged),
    and the embeddings' labels (indices into their own class list; -1: none) as indices into that list."""
    if len(set(emb.classes)) != len(emb.classes):
        raise ConfigError(f"the embeddings in {embeddings} name a class twice in their class list; write the "
                          "embeddings again.")
    if len(labels) and (labels.min() < -1 or labels.max() >= len(emb.classes)):
        raise ConfigError(f"the embeddings in {embeddings} hold labels from {labels.min()} to {labels.max()} for "
                          f"{len(emb.classes)} classes; write the embeddings again.")
    classes = old.classes + [name for name in emb.classes if name not in set(old.classes)]
    where = {name: number for number, name in enumerate(classes)}
    mapping = np.array([where[name] for name in emb.classes] + [-1], dtype=np.int64)  # [-1]: label -1 stays -1
    return classes, mapping[labels]


def new_items(old_keys: np.ndarray, new_keys: np.ndarray, duplicates: str, embeddings: str | Path,
              folder: Path, log) -> np.ndarray:
    """Which of the new items to add: all of them, or, with duplicates="skip", those whose key the index does not
    hold and the embeddings have not given before. One item, one key: a gallery never holds an item twice."""
    _, first = np.unique(new_keys, return_index=True)
    keep = np.zeros(len(new_keys), dtype=bool)
    keep[first] = True  # the first of each key in the embeddings
    held = np.isin(new_keys, old_keys)
    keep &= ~held
    twice = int((~keep).sum())
    if twice and duplicates == "refuse":
        key = str(new_keys[held][0] if held.any() else new_keys[~keep][0])
        what = (f"the index in {folder} already holds {int(held.sum())} key(s) of the embeddings in {embeddings}"
                if held.any() else f"the embeddings in {embeddings} hold {twice} key(s) twice")
        raise ConfigError(f"{what} (first {key!r}); add only embeddings of new items (new shard folders), or pass "
                          "--duplicates skip to add the others.")
    if twice:
        log(f"skipped {twice:,} item(s) the index holds already or the embeddings hold twice; adding "
            f"{int(keep.sum()):,}")
    return keep


def _add(old: IndexInfo, emb: Embeddings, embeddings: str | Path, duplicates: str, chunk: int, log) -> IndexInfo:
    check_same_model(old, emb, embeddings)
    new_keys, new_labels = ids_of(emb)
    classes, new_labels = joined_classes(old, emb, new_labels, embeddings)
    old_keys, old_labels = read_ids(old)
    keep = new_items(old_keys, new_keys, duplicates, embeddings, old.folder, log)
    if not keep.any():  # every item skipped: the index stays as it is, no new generation
        return old
    remove_leftovers(old.folder, old)
    count, generation = old.count + int(keep.sum()), old.generation + 1
    params = grown_params(old.raw["params"], count, old.dim)
    if params != old.raw["params"]:
        log(f"{count:,} vectors in the {params['nlist']} lists trained at build time: nprobe "
            f"{old.raw['params']['search']['nprobe']} -> {params['search']['nprobe']}, as a fresh build probes")
    names, counts = grow_shards(old, emb, keep, generation, chunk)
    write_ids(old.folder, f"ids.g{generation}.npz", np.concatenate([old_keys, new_keys[keep]]),
              np.concatenate([old_labels, new_labels[keep]]))
    sources = old.sources + [s for s in sources_of(emb) if s not in old.sources]
    raw = {**old.raw, "classes": classes, "count": count, "params": params, "shards": names,
           "shard_size": old.shard_size, "shard_counts": counts, "ids": f"ids.g{generation}.npz",
           "generation": generation, "sources": sources}
    return commit(old.folder, raw, old)


def kept_vectors(emb: Embeddings, keep: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    for c in emb.chunks(chunk):
        vectors = c.vectors[keep[c.start : c.start + len(c.vectors)]]
        if len(vectors):
            yield vectors


def grow_shards(old: IndexInfo, emb: Embeddings, keep: np.ndarray, generation: int, chunk: int
                ) -> tuple[list[str], list[int]]:
    """Add the kept vectors to the last shard up to the shard size, then to new shards, each the last one emptied
    (faiss reset: the same trained quantizer and codebooks, no vectors), one shard in memory at a time. Only the
    shards that changed are written, as generation `generation`'s files; returns every shard's file and count."""
    names = list(old.raw["shards"])
    counts = old.shard_counts or [int(read_shard(old.folder / name).ntotal) for name in names]  # an older index
    number = len(names) - 1
    index, changed = read_shard(old.folder / names[number]), False

    def save() -> None:
        name = f"shard-{number:05d}.g{generation}.faiss"
        write_faiss(index, old.folder / name)
        names[number:], counts[number:] = [name], [int(index.ntotal)]

    for vectors in kept_vectors(emb, keep, chunk):
        while len(vectors):
            if index.ntotal >= old.shard_size:  # full: the next shard starts as an empty copy of this one
                if changed:
                    save()
                index.reset()
                number, changed = number + 1, False
            room = old.shard_size - int(index.ntotal)
            index.add(vectors[:room])
            vectors, changed = vectors[room:], True
    if changed:
        save()
    return names, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recog.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="build an index from a folder of embeddings")
    b.add_argument("embeddings")
    b.add_argument("out_dir")
    b.add_argument("--kind", choices=KINDS, default="auto")
    b.add_argument("--shards", type=int, help="split the ids into this many equal indexes; their size, "
                                              "ceil(count / N), is the shard size `add` fills")
    b.add_argument("--shard-size", type=int, help=f"the most vectors a shard holds (default {DEFAULT_SHARD_SIZE:,}): "
                                                  "shards of this size, and `add` starts a new shard when the last "
                                                  "one is full")
    b.add_argument("--train-size", type=int, default=100_000,
                   help=f"IVF indexes (ivfsq, ivfpq; auto above {FLAT_UP_TO:,} vectors) train on a sample of this "
                        "many vectors (at least 39 per list); flat and hnsw need no training")
    b.add_argument("--overwrite", action="store_true", help="replace an index already in OUT_DIR")
    a = commands.add_parser("add", help="add a folder of embeddings of the same model to an index")
    a.add_argument("index_dir")
    a.add_argument("embeddings")
    a.add_argument("--duplicates", choices=DUPLICATES, default="refuse",
                   help="a key the index holds already, or the embeddings hold twice: refuse (default: nothing is "
                        "written; adding the same folder twice is a mistake to see, not to hide) or skip (the index's "
                        "item is kept, the count printed, the rest added: for embeddings that overlap the index on "
                        "purpose)")
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
        info = build(args.embeddings, args.out_dir, args.kind, args.shards, args.train_size, overwrite=args.overwrite,
                     shard_size=args.shard_size)
    else:
        info = add(args.index_dir, args.embeddings, args.duplicates)
    print(f"{info.folder}: {info.count:,} {info.dim}-d vectors, {len(info.classes)} classes, "
          f"{info.raw['params']['factory']}, {len(info.raw['shards'])} shard(s), generation {info.generation}")


if __name__ == "__main__":
    sys.exit(main())
