"""Read a shard's samples by the offsets its index records, in a few large reads, instead of tar header by header.

`index.npz` (written with the shards, loaded by `load_index`; random access reads it too) holds each image's
offset and size in its tar, its label and its key. A piece of a shard is then read in sequential reads of up
to `CHUNK` bytes and sliced there: on local disk and from the node cache a seek and a read per chunk; on an
HTTP stream the bytes before the first wanted one are read and dropped (a stream cannot seek). Python's
tarfile costs ~50-130 µs per member; this costs a few µs.

Each sample's own tar header (the 512 bytes before its image) is read with it and must name an image of the
recorded size; the key is taken from it. A shard rewritten after its index was written (other offsets) fails
that check: `IndexMismatch`, and the caller reads the shard through its tar headers from then on.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

import numpy as np

from recog.data.decode import IMAGE_KEYS
from recog.data.manifest import Manifest
from recog.data.source import ShardSource, join
from recog.errors import ConfigError

log = logging.getLogger(__name__)

CHUNK = 16 << 20  # bytes per read: large enough that a read costs nothing per sample, small enough for memory
BLOCK = 512  # a tar block: each member's header is one
# An image at least this large is read on its own, straight into its bytes: one copy instead of two (a chunk,
# then the slice), which for 100 KB photos costs more than the two extra reads. Smaller ones come in chunks.
ON_ITS_OWN = 32 << 10
NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key and extension, split as webdataset splits them


def load_index(manifest: Manifest, source: ShardSource) -> dict[str, np.ndarray]:
    """The shards' index.npz, as arrays: shard, offset, size, label and key of every sample, and shard_names."""
    if not manifest.index:
        raise ConfigError(f"the shards at {manifest.root} have no index.npz (written by another tool); write them "
                          "again with `python -m recog.data write ...` to read them by index (sampler=pk).")
    with np.load(io.BytesIO(source.read_bytes(join(manifest.root, manifest.index))), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def manifest_positions(manifest: Manifest, index: dict[str, np.ndarray]) -> np.ndarray:
    """For each shard the index lists, its position in the manifest, or -1 where a brace pattern left it out."""
    position = {s.name: i for i, s in enumerate(manifest.shards)}
    return np.array([position.get(str(n), -1) for n in index["shard_names"]], dtype=np.int64)


class IndexMismatch(Exception):
    """A shard's bytes do not match what its index records (rewritten since)."""


@dataclass(frozen=True)
class ShardLayout:
    """Where one shard's images lie: offset of the data, size, and label of each of its samples, in order."""

    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    label: np.ndarray  # int64


class ShardOffsets:
    """The layout of each shard of a manifest, from its index; `of(shard)` is None where there is none to use.

    Loaded once per process (each data-loader worker loads its own). A manifest without an index (shards
    written by other tools) or an index that cannot be fetched leaves every shard to the tar path.
    """

    def __init__(self, layouts: dict[int, ShardLayout]):
        self._layouts = layouts

    @classmethod
    def load(cls, manifest: Manifest, source: ShardSource) -> ShardOffsets:
        """The layouts of every folder of `manifest` (a union's, each from its own index), keyed by the shard's
        position in `manifest`. Labels are as each folder's index records them: the reader maps a union's."""
        layouts = {}
        for part in manifest.parts():
            layouts.update(_folder_layouts(part.manifest, source, part.first))
        return cls(layouts)

    def of(self, shard: int) -> ShardLayout | None:
        return self._layouts.get(shard)

    def drop(self, shard: int, url: str, why: str) -> None:
        """Read `shard` through its tar headers from now on (in this process)."""
        if self._layouts.pop(shard, None) is not None:
            log.warning("shard %s does not match its index (%s): it was rewritten after the index; reading it "
                        "through its tar headers instead (slower). Write the shards again to read them by index.",
                        url, why)


def _folder_layouts(manifest: Manifest, source: ShardSource, first: int) -> dict[int, ShardLayout]:
    """One folder's shard layouts, keyed by the shard's position in the folder's manifest plus `first`; none if it
    has no index or its index cannot be fetched."""
    if not manifest.index:
        return {}
    try:  # one retry only: without the index, the shards are still read (more slowly), so do not wait long
        index = load_index(manifest, replace(source, retries=min(source.retries, 1)))
        positions = manifest_positions(manifest, index)
        bounds = np.searchsorted(index["shard"], np.arange(len(positions) + 1))  # stored shard by shard
        layouts = {}
        for i, shard in enumerate(positions.tolist()):
            lo, hi = bounds[i], bounds[i + 1]
            if shard >= 0 and hi - lo == manifest.shards[shard].samples:
                layouts[first + shard] = ShardLayout(index["offset"][lo:hi], index["size"][lo:hi],
                                                     index["label"][lo:hi])
    except Exception as e:
        log.warning("the index of the shards at %s could not be read (%s); reading them through their tar "
                    "headers instead (slower)", manifest.root, e)
        return {}
    return layouts


def read_indexed(stream: BinaryIO, url: str, layout: ShardLayout, start: int, stop: int) -> Iterator[dict]:
    """Samples [start, stop) of a shard, as webdataset's tar iterator gives them (key, url, image bytes, cls).
    `stream`: the shard, at its start unless it can seek.

    Raises IndexMismatch before yielding a sample whose tar header does not match the index, and EOFError
    where the shard ends before a sample does (the samples before it have been yielded).
    """
    offsets, sizes = layout.offset[start:stop].tolist(), layout.size[start:stop].tolist()  # Python ints: a sample
    labels = layout.label[start:stop].tolist()  # read on its own costs a few µs of bookkeeping, not numpy's
    seekable, position, i = stream.seekable(), 0, 0  # position: where a stream that cannot seek is (its start)
    while i < len(offsets):
        begin, size = offsets[i] - BLOCK, sizes[i]
        if seekable:  # to the sample, wherever the file is (one file may serve many pieces: read_pieces)
            stream.seek(begin)
        else:
            _discard(stream, begin - position)
        if size >= ON_ITS_OWN:
            key, ext = _member(_read_exactly(stream, BLOCK), size)
            if len(image := _read_exactly(stream, size)) < size:
                raise EOFError(f"the shard ends at byte {begin + BLOCK + len(image)}, inside sample {key}")
            yield {"__key__": key, "__url__": url, ext: image, "cls": str(labels[i]).encode()}
            position, i = offsets[i] + size, i + 1
            continue
        j = _chunk_end(offsets, sizes, i)
        position = offsets[j - 1] + sizes[j - 1]
        data = _read_exactly(stream, position - begin)
        view = memoryview(data)
        for n in range(i, j):
            lo, size = offsets[n] - BLOCK - begin, sizes[n]
            key, ext = _member(view[lo:lo + BLOCK], size)
            if lo + BLOCK + size > len(data):
                raise EOFError(f"the shard ends at byte {begin + len(data)}, inside sample {key}")
            yield {"__key__": key, "__url__": url, ext: bytes(view[lo + BLOCK:lo + BLOCK + size]),
                   "cls": str(labels[n]).encode()}
        i = j


def _chunk_end(offsets: list[int], sizes: list[int], i: int) -> int:
    """One past the last sample of the read that starts with sample i (smaller than ON_ITS_OWN): the samples
    that end within CHUNK bytes of its header, stopping before the next large image."""
    limit, j = offsets[i] - BLOCK + CHUNK, i + 1
    while j < len(offsets) and offsets[j] + sizes[j] <= limit and sizes[j] < ON_ITS_OWN:
        j += 1
    return j


def _member(header: bytes | memoryview, size: int) -> tuple[str, str]:
    """Key and extension of the image a tar header describes; IndexMismatch unless it is an image of `size`."""
    block = bytes(header)
    if len(block) < BLOCK:
        raise EOFError("the shard ends inside a tar header")
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if block[257:262] == b"ustar" and (prefix := block[345:500].split(b"\0", 1)[0]):
        name = f"{prefix.decode('utf-8', 'replace')}/{name}"
    field = block[124:136].split(b"\0", 1)[0].strip()
    match = NAME.match(name)
    if not match or match[2].lower() not in IMAGE_KEYS or not field.isdigit() or int(field, 8) != size:
        raise IndexMismatch(f"the tar header at an indexed offset names {name!r}, not an image of {size} bytes")
    return match[1], match[2].lower()


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0 and (chunk := stream.read(left)):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _discard(stream: BinaryIO, n: int) -> None:
    while n > 0 and (chunk := stream.read(min(n, 1 << 20))):
        n -= len(chunk)
    if n > 0:
        raise EOFError("the shard ends before the first wanted sample")
