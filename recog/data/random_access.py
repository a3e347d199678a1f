"""Read any sample of a set of shards by its index: what the P×K sampler needs.

`index.npz`, written with the shards, gives each sample's shard and the offset
and size of its image inside the tar, so a read is one seek and one read, with
no tar parsing. Remote shards are read from the node cache (fetched on first use).
It also records each sample's key (what `recog.serve` looks gallery images up by).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from recog.data.decode import Decode, decode_image
from recog.data.gpu_decode import EncodedImages
from recog.data.loader import Batch, WorkerWarnings, join_batches
from recog.data.manifest import Manifest, item_key
from recog.data.offsets import load_index, manifest_positions
from recog.data.source import ShardSource, is_remote
from recog.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ALL_UNREADABLE = "every sample of a P×K batch was unreadable; the shards are damaged: write them again."


def folder_items(manifest: Manifest, source: ShardSource, first: int) -> tuple[np.ndarray, ...]:
    """One folder's samples as its index lists them: shard (its position in the folder's manifest plus `first`),
    offset, size, label (the folder's own) and key. A brace pattern may have selected some of the folder's
    shards: their samples only."""
    index = load_index(manifest, source)
    shard = manifest_positions(manifest, index)[index["shard"]]
    keep = shard >= 0
    return shard[keep] + first, index["offset"][keep], index["size"][keep], index["label"][keep], index["key"][keep]


class ShardRandomAccess(Dataset):
    """Map-style data set over shards: item i is (uint8 image C×H×W after `transform`, label), or None if unreadable."""

    def __init__(self, manifest: Manifest, source: ShardSource | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, channels: int = 1,
                 decode: Decode = decode_image, encoded: bool = False):
        self.manifest, self.source = manifest, source or ShardSource()
        parts = manifest.parts()
        if any(is_remote(part.manifest.root) for part in parts) and self.source.cache_dir is None:
            raise ConfigError("reading remote shards by index needs a node cache; set data.cache_dir.")
        # a union's items: each folder's, one folder after another, labels mapped to the union's
        columns = [folder_items(part.manifest, self.source, part.first) for part in parts]
        self.shard, self.offset, self.size, self.labels, self._keys = (
            columns[0] if len(columns) == 1 else [np.concatenate(c) for c in zip(*columns)])
        self._identities = [part.manifest.identity for part in parts]
        self._folder = np.repeat(np.arange(len(parts)), [len(column[0]) for column in columns])
        if manifest.folders:
            for part, column in zip(parts, columns):
                if len(column[3]) and not (column[3].min() >= 0 and column[3].max() < len(part.labels)):
                    raise ConfigError(f"the index of {part.location} holds labels outside its "
                                      f"{len(part.labels)} classes; write those shards again.")
            self.labels = np.concatenate([np.asarray(part.labels, dtype=np.int64)[column[3]]
                                          for part, column in zip(parts, columns)])
        self.transform, self.channels, self.decode = transform, channels, decode
        self.encoded = encoded  # data.decode=gpu: a batch's encoded images, undecoded (see encoded_batch)
        self._files: dict[int, object] = {}

    def __getstate__(self):  # open files stay in the process that opened them
        return {**self.__dict__, "_files": {}}

    def __len__(self) -> int:
        return len(self.labels)

    def _file(self, shard: int):
        if shard not in self._files:
            url, sha = self.manifest.url(shard), self.manifest.shards[shard].sha256
            path = url if not is_remote(url) else self.source.cached(url, sha)
            self._files[shard] = open(path, "rb")
        return self._files[shard]

    def __getitems__(self, step: tuple[int, list[list[int]]]) -> tuple[int, list]:
        """A whole step (what the P×K sampler yields: the step and its indices, micro-batch by micro-batch; the
        DataLoader calls this when a batch sampler is used). Augmentation is seeded from each micro-batch's
        indices, so it looks the same after a mid-epoch resume, on any number of ranks. data.decode=gpu: each one's
        encoded images (encoded_batch)."""
        number, micro_batches = step
        items = []
        for indices in micro_batches:
            seed = zlib.crc32(np.asarray(indices, dtype=np.int64).tobytes())
            if self.encoded:
                items.append(self.encoded_batch(indices, seed))
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                items.append([self[i] for i in indices])
        return number, items

    def encoded_batch(self, indices: list[int], seed: int) -> Batch:
        """data.decode=gpu: the batch's images as stored, with the seed their augmentation draws from; the training
        process decodes and augments them (recog.data.gpu_decode). `collate` passes the Batch on."""
        encoded, labels, names = [], [], []
        for i in indices:
            where = self.manifest.url(int(self.shard[i]))
            try:
                encoded.append(self.read_bytes(i))
            except OSError as e:
                log.warning("skipping unreadable sample %d of %s (%s)", i, where, e)
                continue
            labels.append(int(self.labels[i]))
            names.append(f"{i} of {where}")
        if not encoded:
            raise DataError(ALL_UNREADABLE)
        warnings = WorkerWarnings.in_this_worker()
        return Batch(EncodedImages.pack(encoded, seed, tuple(names)), torch.tensor(labels),
                     len(indices) - len(encoded), warnings=warnings.take() if warnings else ())

    def keys(self) -> np.ndarray:
        """Every sample's key (its name in the shard, without the extension), in item order."""
        return self._keys

    def item_keys(self) -> list[str]:
        """Every sample's name across folders (`item_key`: its folder's identity and its key), in item order: a
        union's keys may repeat from folder to folder, these do not."""
        return [item_key(self._identities[f], str(k)) for f, k in zip(self._folder.tolist(), self._keys.tolist())]

    def read_bytes(self, i: int) -> bytes:
        """Item i's encoded image, as stored in its shard (one positioned read: safe from several threads)."""
        f = self._file(int(self.shard[i]))
        return os.pread(f.fileno(), int(self.size[i]), int(self.offset[i]))

    def __getitem__(self, i: int):
        shard = int(self.shard[i])
        try:
            image = self.decode(self.read_bytes(i), self.channels)
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable sample %d of %s (%s)", i, self.manifest.url(shard), e)
            return None
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def collate(step: tuple[int, list]) -> Batch:
    """Stack the readable items of a step's P×K batches (one per micro-batch of this rank, one after another:
    `Batch.sizes`); unreadable ones are counted in `skipped`. Batches of encoded images (encoded_batch,
    data.decode=gpu) are joined as they are."""
    number, micro_batches = step
    if all(isinstance(items, Batch) for items in micro_batches):
        return join_batches(micro_batches)._replace(step=number)
    good = [[item for item in items if item is not None] for items in micro_batches]
    if not any(good):
        raise DataError(ALL_UNREADABLE)
    warnings = WorkerWarnings.in_this_worker()
    images = [image for items in good for image, _ in items]
    return Batch(torch.stack(images), torch.tensor([label for items in good for _, label in items]),
                 sum(map(len, micro_batches)) - len(images), warnings=warnings.take() if warnings else (), step=number,
                 sizes=tuple(map(len, good)) if len(good) > 1 else ())
