"""Where shards live: local paths, http(s) URLs (cached on the node's disk), other schemes only by opt-in.

A remote shard is downloaded once per node into `cache_dir` (processes on the
node take turns through a file lock, so each shard crosses the network once),
checked against the manifest's sha256 before it is renamed into place, and read
from local disk in every later epoch. Without a cache folder remote shards are
streamed straight from the server every epoch.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from recog.errors import ConfigError, DataError
from recog.files import sha256_of

log = logging.getLogger(__name__)


class FetchError(DataError):
    """A server that stays down or keeps answering with an error: the run cannot go on."""


class ShardCorrupt(DataError):
    """A downloaded shard whose sha256 differs from the manifest's: it is skipped (or stops a strict run)."""


def scheme_of(url: str) -> str:
    scheme = urlparse(url).scheme
    return "file" if scheme in ("", "file") or len(scheme) == 1 else scheme  # 1 letter: a Windows drive


def is_remote(url: str) -> bool:
    return scheme_of(url) != "file"


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else os.path.join(root, name)


@dataclass(frozen=True)
class ShardSource:
    cache_dir: str | None = None  # node-local folder for remote shards (e.g. /dev/shm/recog for RAM); None: stream
    retries: int = 4  # tries after the first one, with exponential backoff
    backoff_s: float = 0.5
    timeout_s: float = 60.0
    allowed_schemes: tuple[str, ...] = ("file", "http", "https")

    def check(self, url: str) -> None:
        scheme = scheme_of(url)
        if scheme not in self.allowed_schemes:
            raise ConfigError(f"shard location {url} uses scheme '{scheme}', which is not allowed; use a local path "
                              f"or http(s), or add '{scheme}' to data.allowed_schemes if you trust it.")

    def read_bytes(self, url: str) -> bytes:
        """A small file (a manifest): local read, or a GET with retries."""
        self.check(url)
        if not is_remote(url):
            return Path(_local_path(url)).read_bytes()
        with self._get(url) as response:
            return response.read()

    def open(self, url: str, sha256: str = "") -> BinaryIO:
        """A binary stream of the shard at `url`."""
        self.check(url)
        scheme = scheme_of(url)
        if scheme == "file":
            return open(_local_path(url), "rb")
        if scheme not in ("http", "https"):  # opted in by the user: webdataset knows how to open these
            import webdataset as wds

            return wds.gopen(url, "rb")
        if self.cache_dir is None:
            return self._get(url)
        return open(self.cached(url, sha256), "rb")

    def cache_path(self, url: str, sha256: str) -> Path:
        key = sha256[:16] or hashlib.sha256(url.encode()).hexdigest()[:16]
        return Path(self.cache_dir) / f"{key}-{url.rstrip('/').rsplit('/', 1)[-1]}"

    def cached(self, url: str, sha256: str) -> Path:
        """Download `url` into the node cache unless it is there already; return the local path."""
        path = self.cache_path(url, sha256)
        if path.is_file() and self._still_good(path, sha256):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_name(path.name + ".lock")):
            if path.is_file() and self._still_good(path, sha256):  # fetched by another process meanwhile
                return path
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                digest = self._download(url, tmp)
                if sha256 and digest != sha256:
                    raise ShardCorrupt(f"shard {url} has sha256 {digest[:12]}…, the manifest says {sha256[:12]}…; "
                                       "the copy on the server is damaged: write it again.")
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    @staticmethod
    def _still_good(path: Path, sha256: str) -> bool:
        """Check a cached shard against its sha256 once per process; a damaged copy is deleted."""
        if not sha256 or str(path) in _VERIFIED:
            return True
        if sha256_of(path) == sha256:
            _VERIFIED.add(str(path))
            return True
        log.warning("cached shard %s does not match its sha256; fetching it again", path)
        path.unlink(missing_ok=True)
        return False

    def _download(self, url: str, dest: Path) -> str:
        """Stream `url` into `dest`, retrying from scratch if the transfer fails; return its sha256."""
        def once() -> str:
            digest = hashlib.sha256()
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response, open(dest, "wb") as out:
                while block := response.read(1 << 20):
                    digest.update(block)
                    out.write(block)
            return digest.hexdigest()

        return self._with_retries(url, once)

    def _get(self, url: str):
        return self._with_retries(url, lambda: urllib.request.urlopen(url, timeout=self.timeout_s))

    def _with_retries(self, url: str, attempt):
        """Call `attempt()`; on a network error or an HTTP error status (404 too: a shard may be missing for
        a moment while files are synced to the server) wait backoff_s, 2×, 4×, ... and try again."""
        last = None
        for n in range(self.retries + 1):
            if n:
                time.sleep(self.backoff_s * 2 ** (n - 1))
            try:
                return attempt()
            except OSError as e:  # refused, reset, timed out, cut short; urllib's HTTPError is an OSError too
                last = e
                log.warning("fetching %s failed (%s); try %d of %d", url, e, n + 1, self.retries + 1)
        raise FetchError(f"could not fetch {url} after {self.retries + 1} tries ({last}); "
                         "check that the server is up and the URL is right.")


_VERIFIED: set[str] = set()  # cached shards this process has checked


@contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

