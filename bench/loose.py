"""Loose image files (one file, or one HTTP request, per image): the baseline that shards are measured against.

Not used for training. Same decode and transforms as the shard stream, so a
benchmark compares only how the bytes arrive.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch.utils.data import IterableDataset, get_worker_info

from recog.data.decode import decode_image
from recog.data.loader import Batch
from recog.data.write import IMAGE_EXTS


def image_folder(root: str | Path) -> list[tuple[str, int]]:
    """(path, label) for an ImageFolder layout: one sub-folder per class, sorted by name."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(str(path), label) for label, name in enumerate(classes)
            for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_EXTS]


class _HttpReader:
    """GET one URL per image over a kept-alive connection (what a well-behaved client does)."""

    def __init__(self):
        self.connection: http.client.HTTPConnection | None = None

    def __call__(self, url: str) -> bytes:
        parts = urlparse(url)
        for attempt in range(2):  # a server may close a kept-alive connection: reconnect once
            if self.connection is None:
                self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            try:
                self.connection.request("GET", parts.path)
                response = self.connection.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close" or response.version == 10:
                    self.connection.close()
                    self.connection = None
                if response.status != 200:
                    raise OSError(f"GET {url}: HTTP {response.status}")
                return data
            except (http.client.HTTPException, ConnectionError):
                self.connection = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class LooseImages(IterableDataset):
    """Batches from a list of (path or http URL, label), split among data-loader workers."""

    def __init__(self, items: Sequence[tuple[str, int]], batch_size: int, channels: int = 3,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, decode: bool = True):
        self.items, self.batch_size, self.channels = list(items), batch_size, channels
        self.transform, self.decode = transform, decode

    def __iter__(self) -> Iterator[Batch | list[bytes]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.items[worker::workers]
        read = _HttpReader() if mine and mine[0][0].startswith("http") else (lambda p: Path(p).read_bytes())
        for start in range(0, len(mine), self.batch_size):
            chunk = mine[start : start + self.batch_size]
            raw = [read(location) for location, _ in chunk]
            if not self.decode:
                yield raw
                continue
            images = []
            for data in raw:
                image = decode_image(data, self.channels)
                images.append(self.transform(image) if self.transform else image)
            yield Batch(torch.stack(images), torch.tensor([label for _, label in chunk]), 0)
