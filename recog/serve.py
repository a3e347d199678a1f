"""Identify over HTTP: what `recog.identify` answers, for many clients at once, and a page to try it on.

    python -m recog.serve --model EXPORT_DIR --index INDEX_DIR [--shards GALLERY_SHARDS ...] [--port 8000]

    POST /identify?k=5        an image, as the request body or a multipart file field -> {"vote", "matches":
                              [{"key", "label", "class", "score"}, ...], "timing_ms": {"decode", "model",
                              "search"}, "batch", "model_sha256", "index_generation", "index_id"}:
                              recog.identify --json's fields, where the time went, and which export and index
                              answered
    GET  /items/{key}/image   a gallery item's image, read from --shards (the shards the gallery was embedded from);
                              revalidated by its ETag (a rebuilt gallery may give a key another image)
    GET  /healthz             what is served (the model's sha256, the index's generation), the requests in
                              flight, the reloads
    GET  /                    a page: choose or drop a photo, see its nearest gallery items

Concurrent requests are embedded and searched together: a batch is every image that arrived while the batch
threads were busy, up to --max-batch (--max-wait-ms > 0 also waits that long after a batch's first image for more);
--batch-threads batches run at once (default: the cores / torch's threads, so that the model fills the cores). At
most --max-inflight requests are held at once; past that the answer is 503 at once (a client retries, a load
balancer tries another replica) instead of a queue that grows without end. Bad input is a 4xx with {"error": one
sentence}, and the next request is served as if it had not happened. SIGTERM: no new connections, the requests
in flight are finished (at most --grace-s seconds), then the process exits with status 0.

SIGHUP: the export and the index are loaded again from their paths (a symlink is followed once per reload) on a
thread of their own while the service answers; a pair whose index was built from another model, or that does not
load, is refused in one log line and the old pair goes on. Every request is answered by the pair that was current
when it arrived (it decoded the image for that model): none fails at the switch. Each answer and /healthz name
the pair ("model_sha256", "index_generation", "index_id"). A SIGHUP during a reload asks for one more reload
after it (all of them together: one), since the files may have changed after the running one read them.

One process holds all of the index's shards, or (--shard-servers) none of them, each searched by its own
`python -m recog.index serve-shard` process, on any machine (recog.shard_server; with --shard-token or
RECOG_SHARD_TOKEN when the servers want one; SIGHUP is refused there: see reload). More traffic: more replicas
behind a load balancer (README, "Serve").
"""

from __future__ import annotations

import signal

# Run as `python -m recog.serve`, a SIGHUP (a reload asked for while the service starts: a daily job that adds to
# the index right after a restart) would end the process while torch loads, its default action. From here on it
# is noted instead, and answered by one reload once the service listens (serve, Reloader.start).
EARLY_SIGHUPS: list[int] = []
if __name__ == "__main__":
    signal.signal(signal.SIGHUP, lambda number, frame: EARLY_SIGHUPS.append(number))

import argparse
import asyncio
import hashlib
import logging
import os
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from recog.data.decode import MAX_SIDE_RATIO, ImageRefused, decode_image, header_size
from recog.data.manifest import load_manifest
from recog.data.random_access import ShardRandomAccess
from recog.data.source import ShardSource
from recog.errors import ConfigError, RecogError
from recog.exported import ExportedEmbedder
from recog.gallery import open_gallery
from recog.identify import answer, check_match, gallery_class_names
from recog.index_files import IndexInfo
from recog.listen import bind
from recog.shard_server import TOKEN_ENV, port_number
from recog.shell import run_command

try:  # the serve extra (module level: FastAPI reads the endpoints' annotations from this module's names)
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError:
    FastAPI = None

log = logging.getLogger("recog.serve")

PAGE = "serve_page.html"
MAX_K = 100
ENDPOINTS = "POST /identify, GET /items/{key}/image, GET /healthz and GET /"


class BadRequest(Exception):
    """A request this service refuses: its HTTP status and one sentence for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def image_kind(data: bytes) -> str:
    """The media type of an encoded image, from its first bytes."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def decode_upload(data: bytes, channels: int, preprocess, max_pixels: int) -> torch.Tensor:
    """An uploaded file -> the model's uint8 C×S×S input (grey or RGB as the model wants), or a BadRequest.
    The image's size is read from its header before anything is decoded: a decompression bomb costs nothing."""
    if not data:
        raise BadRequest(400, "the request holds no image; send the image file as the body or as a multipart file "
                              "field.")
    try:
        header_size(data, max_pixels)
    except ImageRefused as e:
        if e.why == "not an image":
            raise BadRequest(415, "the upload is not an image this service can decode; send a PNG, JPEG or WebP "
                                  "file.") from None
        if e.why == "too thin":
            raise BadRequest(400, f"the image is {e.width}×{e.height} pixels, too thin to resize (its sides differ "
                                  f"by more than {MAX_SIDE_RATIO}:1); send a photo of the object.") from None
        if not e.width:  # beyond Pillow's own limit, which --max-pixels sets
            raise BadRequest(413, f"the image has more pixels than the {Image.MAX_IMAGE_PIXELS:,} of the "
                                  "decompression-bomb limit (--max-pixels); send a smaller image.") from None
        raise BadRequest(413, f"the image is {e.width}×{e.height} pixels, more than the {max_pixels:,} this "
                              "service decodes (--max-pixels); send a smaller image.") from None
    try:
        return preprocess(decode_image(data, channels))
    except Exception as e:  # a truncated or damaged file: PIL raises many kinds
        reason = str(e).split("\n")[0][:80] or type(e).__name__
        raise BadRequest(400, f"the image could not be decoded ({reason}); send the whole file, undamaged.") from None


# Images this small (by their header) are decoded on the event loop, not handed to a decode thread and back (that
# hand-over took ~a tenth of the loop's time at 32 clients, py-spy, bench/serve_peers.py): on this 2-core machine,
# loaded, a 64×64 noise PNG decodes in 0.27 ms, a JPEG in 1.1 ms; a 256×256 one in 6-7 ms, too long to block it
INLINE_DECODE_PIXELS = 64 * 64


def small_image(data: bytes) -> bool:
    """Whether an upload is an image of at most INLINE_DECODE_PIXELS by its header (anything else, a refused one
    included, is decoded, or refused, on a decode thread)."""
    if not data or len(data) > INLINE_DECODE_PIXELS * 4:
        return False
    try:
        header_size(data, INLINE_DECODE_PIXELS)
    except ImageRefused:
        return False
    return True


def parse_k(value: str | None, default: int, limit: int) -> int:
    if value is None:
        return default
    try:
        k = int(value)
    except ValueError:
        k = 0
    if not 1 <= k <= limit:
        raise BadRequest(400, f"k={value[:20]!r} is not a number of matches from 1 to {limit}; give k in that range.")
    return k


@dataclass
class Query:
    pixels: torch.Tensor
    k: int
    done: asyncio.Future
    arrived: float  # the event loop's clock: a batch closes max_wait after its first query arrived
    pair: Pair | None = None  # the export and index it was decoded for, and is answered by


class Batcher:
    """Requests' images embedded and searched together. A batch is every query waiting when a batch thread came
    free, up to `max_batch` (and, with `max_wait_s` > 0, those arriving that long after its first). Up to `workers`
    batches run at once, each on a thread of its own (the model and faiss release the GIL, and use their own
    threads inside), while the event loop takes requests for the next batch."""

    def __init__(self, compute, max_batch: int, max_wait_s: float, workers: int = 1):
        self.compute, self.max_batch, self.max_wait_s, self.workers = compute, max_batch, max_wait_s, workers
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="recog-batch")
        self.queue: asyncio.Queue[Query] | None = None
        self.task: asyncio.Task | None = None
        self.running: set[asyncio.Task] = set()  # batches being computed (their answers not yet handed out)

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="recog-batcher")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        """The batcher only ends when the service stops; if a bug ended it, no request may wait for it in vain."""
        if task.cancelled():
            return
        log.error("the batcher stopped (%r); failing the requests that wait", task.exception())
        while not self.queue.empty():
            query = self.queue.get_nowait()
            if not query.done.done():
                query.done.set_exception(RuntimeError("the batcher stopped"))

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, *self.running, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, pixels: torch.Tensor, k: int, pair: Pair | None = None):
        loop = asyncio.get_running_loop()
        if self.task.done():
            raise RuntimeError("the batcher stopped")
        query = Query(pixels, k, loop.create_future(), loop.time(), pair)
        await self.queue.put(query)
        return await query.done

    async def _next_batch(self) -> list[Query]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = batch[0].arrived + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [query for query in batch if not query.done.done()]  # cancelled (at the shutdown's end): left out

    async def _run(self) -> None:
        """A batch is taken from the queue once a batch thread is free (the queries that came meanwhile wait
        together for it), and computed while the next one is gathered."""
        free = asyncio.Semaphore(self.workers)
        while True:
            await free.acquire()
            batch = await self._next_batch()
            if not batch:
                free.release()
                continue
            task = asyncio.get_running_loop().create_task(self._answer(batch))
            self.running.add(task)
            task.add_done_callback(lambda done: (self.running.discard(done), free.release()))

    async def _answer(self, batch: list[Query]) -> None:
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.compute, batch)
        except Exception as e:  # noqa: BLE001 - every waiting request learns of it; the service stays up
            log.exception("a batch of %d failed", len(batch))
            results = [e] * len(batch)
        for query, result in zip(batch, results):
            if query.done.done():
                continue
            if isinstance(result, Exception):
                query.done.set_exception(result)
            else:
                query.done.set_result(result)


def default_batch_threads() -> int:
    """Batches computed at once: enough for the model's threads to fill the cores. With one torch thread
    (OMP_NUM_THREADS=1) on 2 cores: 2, measured (bench/serve_peers.py): one batch at a time left a core to the
    event loop alone, and LitServe's 2 workers (a model each) answered 32 clients faster; with torch's default
    (a thread per core): 1, as before."""
    return max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))


@dataclass(frozen=True)
class PairSource:
    """Where the export and the index are loaded from, at start and at every reload: their paths as given (each
    load follows a symlink once, so that one load never mixes two folders' files), and how the index is searched
    and its items' images read."""

    model_dir: str
    index_dir: str
    shards: list[str] | None = None
    cache_dir: str | None = None
    shard_servers: list[tuple[str, int]] | None = None
    shard_token: str | None = None
    default_k: int = 5
    device: str = "cpu"  # where the model computes (--device)


def check_device(device: str) -> None:
    """--device: one sentence for a device this machine lacks, before anything loads."""
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device} is not a device; give cpu, cuda or cuda:N.") from None
    if where.type == "cuda" and (not torch.cuda.is_available() or (where.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} usable GPU(s); give "
                          "--device cpu (the default) or a GPU it has.")
    if where.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: recog.serve computes on cpu or cuda; give one of those.")


class Pair:
    """An export and the index built with it, loaded and checked together (the index's model sha256 is the
    export's, and one query runs through both): a request is decoded, embedded and searched with one pair, and
    its answer names the pair (`names`: the model's sha256 and the index's generation)."""

    def __init__(self, source: PairSource, previous: Pair | None = None):
        model_dir, index_dir = Path(source.model_dir).resolve(), Path(source.index_dir).resolve()
        self.embedder = ExportedEmbedder(model_dir, source.device)
        self.gallery = open_gallery(index_dir, source.shard_servers, source.shard_token)
        check_match(self.embedder, self.gallery, str(model_dir), str(index_dir))
        blank = torch.zeros((1, self.embedder.channels, self.embedder.size, self.embedder.size), dtype=torch.uint8)
        self.gallery.search(self.embedder.embed(blank), 1)  # both run (and the first request does not wait on it)
        self.classes = gallery_class_names(self.embedder, self.gallery)
        self.items = gallery_images(source, self.gallery.info, previous)
        self.max_k = min(MAX_K, self.gallery.info.count)
        self.default_k = min(source.default_k, self.max_k)
        self.names = {"model_sha256": self.embedder.sha256, "index_generation": self.gallery.info.generation,
                      "index_id": self.gallery.info.identity}
        params, info = self.gallery.info.raw["params"], self.gallery.info
        self.description = {
            **self.names, "embedding_dim": self.embedder.dim,
            "input": {"channels": self.embedder.channels, "size": self.embedder.size},
            "index": {"kind": params["kind"], "factory": params["factory"], "count": info.count,
                      "generation": info.generation, "shards": len(info.raw["shards"]),
                      "shard_servers": [f"{host}:{port}" for host, port in source.shard_servers or []]},
            "gallery_images": self.items is not None, "classes": self.classes, "max_k": self.max_k,
            "default_k": self.default_k,
        }

    def decode(self, data: bytes, max_pixels: int) -> torch.Tensor:
        return decode_upload(data, self.embedder.channels, self.embedder.preprocess, max_pixels)

    def compute(self, batch: list[Query]) -> list[dict]:
        """On the batch thread: one model call for the batch, one search per distinct k."""
        started = time.perf_counter()
        vectors = self.embedder.embed(torch.stack([query.pixels for query in batch]))
        embedded = time.perf_counter()
        answers: list[dict] = [{}] * len(batch)
        for k in sorted({query.k for query in batch}):
            rows = [i for i, query in enumerate(batch) if query.k == k]
            scores, ids = self.gallery.search(vectors[rows], k)
            for row, i in enumerate(rows):
                answers[i] = answer(self.gallery, self.classes, scores[row], ids[row])
        searched = time.perf_counter()
        timing = {"model": round(1000 * (embedded - started), 3), "search": round(1000 * (searched - embedded), 3)}
        return [{**a, "timing_ms": dict(timing), "batch": len(batch), **self.names} for a in answers]

    def summary(self) -> str:
        """For the log: which model and which index generation, how many items, and their images."""
        info, items = self.gallery.info, self.items
        images = "" if items is None else f"; {len(items):,} gallery images" + (
            f" (none from {', '.join(items.missing)})" if items.missing else "")
        return (f"model {self.embedder.sha256[:12]} ({self.embedder.folder}), index generation {info.generation} "
                f"({info.folder}, {info.count:,} vectors){images}")


def gallery_images(source: PairSource, info: IndexInfo, previous: Pair | None) -> GalleryImages | None:
    """The matches' images (with --shards): at start, the folders given; at a reload, those of them the new index
    still names, and each other folder the index names, read where recog.embed read it (the index records where:
    a running process takes no arguments). One that cannot be read there is left out (its items' images are a
    404, its items still answered), not a reason to refuse the pair."""
    if not source.shards:
        return None
    if previous is None:
        return GalleryImages(source.shards, info.sources, source.cache_dir, str(info.folder))
    named = {s["identity"]: s["location"] for s in info.sources}
    if previous.items.known == named:  # the same folders: nothing to read again
        return previous.items
    kept = {identity: where for identity, where in previous.items.locations.items() if identity in named}
    others = [where for identity, where in named.items() if identity not in kept]
    return GalleryImages(list(kept.values()), info.sources, source.cache_dir, str(info.folder), optional=others)


class Reloader:
    """SIGHUP's work on a thread of its own, so that the service goes on answering: `reload` runs once per SIGHUP,
    except that every SIGHUP that comes while one runs asks for one more run after it, not one each (the files may
    have changed after the running one read them; one fresh read covers them all). The signal only wakes the
    thread: the event loop calls `request` (loop.add_signal_handler), and the handler itself does nothing."""

    def __init__(self, reload):
        self.reload = reload
        self.wanted, self.running, self.stopping = threading.Event(), False, False
        self.early: list[int] = []  # SIGHUPs that came before the event loop ran (serve's first handler notes them)
        self.thread = threading.Thread(target=self._run, name="recog-reload", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            loop.add_signal_handler(signal.SIGHUP, self.request)
        self.thread.start()
        if self.early:
            self.request()

    def request(self) -> None:
        if self.running and not self.wanted.is_set():
            log.info("SIGHUP during a reload: one more reload follows this one")
        self.wanted.set()

    def stop(self) -> None:
        self.stopping = True
        self.wanted.set()

    def _run(self) -> None:
        while True:
            self.wanted.wait()
            if self.stopping:
                return
            self.wanted.clear()
            self.running = True
            try:
                self.reload()
            except Exception:  # noqa: BLE001 - a bug: logged whole; the old pair goes on, and the next SIGHUP
                log.exception("the reload failed")
            finally:
                self.running = False


class Service:
    """An export and an index (a Pair), loaded at start and again on SIGHUP; optionally the gallery's shards, to
    show the matches' images."""

    def __init__(self, model_dir: str, index_dir: str, shards: list[str] | str | None = None, *, max_batch: int = 32,
                 max_wait_ms: float = 0.0, max_inflight: int = 256, max_bytes: int = 20 << 20,
                 max_pixels: int = Image.MAX_IMAGE_PIXELS, default_k: int = 5, read_timeout_s: float = 30.0,
                 cache_dir: str | None = None, decode_threads: int = 0, batch_threads: int = 0,
                 shard_servers: list[tuple[str, int]] | None = None, shard_token: str | None = None,
                 device: str = "cpu"):
        check_device(device)
        for name, value in (("--max-batch", max_batch), ("--max-inflight", max_inflight), ("-k", default_k)):
            if value < 1:
                raise ConfigError(f"{name} {value} must be 1 or more.")
        if batch_threads < 0:
            raise ConfigError(f"--batch-threads {batch_threads} must be 0 (the cores / the torch threads) or more.")
        shards = [shards] if isinstance(shards, str) else shards
        self.source = PairSource(str(model_dir), str(index_dir), [str(s) for s in shards] if shards else None,
                                 cache_dir, shard_servers, shard_token, default_k, device)
        self.pair = Pair(self.source)  # a request takes the current pair once, when it arrives (identify)
        self.max_inflight, self.max_bytes, self.max_pixels = max_inflight, max_bytes, max_pixels
        self.read_timeout_s = read_timeout_s
        self.inflight, self.served = 0, 0
        self.reloads = {"done": 0, "refused": 0}  # on /healthz, with whether one runs now
        # images decoded at once (a decoded image at the pixel limit takes hundreds of MB): one per core by default
        self.decoding = asyncio.Semaphore(decode_threads or os.cpu_count() or 1)
        self.batcher = Batcher(self.compute, max_batch, max_wait_ms / 1000, batch_threads or default_batch_threads())
        self.reloader = Reloader(self.reload)

    @property
    def description(self) -> dict:
        return {**self.pair.description, "reloads": {**self.reloads, "running": self.reloader.running}}

    @property
    def items(self) -> GalleryImages | None:
        return self.pair.items

    def compute(self, batch: list[Query]) -> list[dict]:
        """On the batch thread: each query with the pair it was decoded for (one pair; two in a batch that meets a
        reload's switch, each with its own model call)."""
        answers: list[dict] = [{}] * len(batch)
        for pair in dict.fromkeys(query.pair for query in batch):
            rows = [i for i, query in enumerate(batch) if query.pair is pair]
            for i, result in zip(rows, pair.compute([batch[i] for i in rows])):
                answers[i] = result
        return answers

    def reload(self) -> None:
        """On the reload thread: the pair loaded again from its paths and checked, then current for the requests
        that arrive next, while those in flight finish on the old one (freed when the last of them is answered).
        A pair that does not load or does not match: one log line, and the old pair goes on."""
        old, started, served = self.pair, time.perf_counter(), self.served
        if self.source.shard_servers:
            log.warning("SIGHUP: no reload with --shard-servers: each serve-shard process holds one generation of "
                        "its shard and cannot switch with this one; start shard servers and a recog.serve on the "
                        "new generation beside these, then move the load balancer to it")
            self.reloads["refused"] += 1  # after its line: /healthz counts what the log says
            return
        try:
            new = Pair(self.source, old)
        except Exception as e:  # noqa: BLE001 - whatever stops the new pair, the old one goes on serving
            reason = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {str(e)[:200]}"
            log.warning("reload refused, still serving model %s with index generation %d: %s",
                        old.embedder.sha256[:12], old.gallery.info.generation, reason.replace("\n", " "))
            self.reloads["refused"] += 1
            return
        self.pair = new
        log.info("reloaded in %.2f s (%d requests answered meanwhile): %s", time.perf_counter() - started,
                 self.served - served, new.summary())
        self.reloads["done"] += 1

    @asynccontextmanager
    async def lifespan(self, app):
        self.batcher.start()
        self.reloader.start(asyncio.get_running_loop())
        yield
        self.reloader.stop()
        await self.batcher.stop()
        log.info("stopped after %d requests answered", self.served)

    async def decode_request(self, request: Request, k: str | None, pair: Pair) -> tuple[torch.Tensor, int, float]:
        """POST /identify's request -> the model's input, the matches asked for, and the decode's milliseconds."""
        top = parse_k(k, pair.default_k, pair.max_k)
        try:
            data = await asyncio.wait_for(read_upload(request, self.max_bytes), self.read_timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(408, f"the upload took longer than {self.read_timeout_s:g} s (--read-timeout-s); send "
                                  "it again.") from None
        except ClientDisconnect:
            raise BadRequest(400, "the client went away before its upload ended.") from None
        if small_image(data):  # decoded here: a thread's hand-over costs more than the decode
            started = time.perf_counter()
            pixels = pair.decode(data, self.max_pixels)
            return pixels, top, round(1000 * (time.perf_counter() - started), 3)
        async with self.decoding:
            started = time.perf_counter()
            pixels = await run_in_threadpool(pair.decode, data, self.max_pixels)
            decoded = time.perf_counter()
        return pixels, top, round(1000 * (decoded - started), 3)

    async def predict(self, pixels: torch.Tensor, k: int, pair: Pair) -> dict:
        """Embedded and searched with the other requests of its batch (compute), by `pair`."""
        return await self.batcher.submit(pixels, k, pair)

    def encode_response(self, result: dict, decode_ms: float) -> dict:
        result["timing_ms"]["decode"] = decode_ms
        self.served += 1
        return result

    async def item_image(self, key: str, if_none_match: str) -> Response:
        """GET /items/{key}/image: the gallery item's encoded image, or 304 when the client's copy is current."""
        items = self.pair.items
        if items is None:
            raise BadRequest(404, "this service was started without --shards, so it serves no gallery images; "
                                  "start it with --shards GALLERY_SHARDS.")
        data = await run_in_threadpool(items.read, key)
        if data is None:
            raise BadRequest(404, f"no gallery item has the key {key[:40]!r}.")
        # no-cache, not max-age: a rebuilt gallery may give a key another image; the ETag (the bytes' hash) lets a
        # browser keep its copy after a 304. nosniff: the bytes are shown as the image type they were sent as only
        tag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
        headers = {"ETag": tag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if etag_matches(if_none_match, tag):
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=image_kind(data), headers=headers)


class GalleryImages:
    """The gallery items' encoded images, looked up by key (`IDENTITY:KEY`, recog.embeddings) in the index of the
    shard folder whose identity the key names, never joined into a path. Every folder given must be one the
    gallery was embedded from (its identity, a hash of its shard list, is in the index's sources); an `optional`
    one (where the index says a folder was, at a reload) that cannot be read, or is not one of them, is left out."""

    def __init__(self, locations: list[str], sources: list[dict], cache_dir: str | None = None,
                 index_dir: str = "the index", optional: list[str] = ()):
        if not sources:
            raise ConfigError(f"{index_dir} does not record which shard folders its items come from (it was built "
                              "from embeddings of another tool or an older recog); build it again from "
                              "python -m recog.embed's embeddings to show its images, or leave out --shards.")
        source, self.known = ShardSource(cache_dir=cache_dir), {s["identity"]: s["location"] for s in sources}
        self.folders, self.locations = {}, {}  # identity -> (its shards, key -> position); identity -> location
        for location in [*locations, *optional]:
            try:
                manifest = load_manifest(location, source)
                if manifest.identity not in self.known:
                    listed = ", ".join(f"{where} ({identity})" for identity, where in self.known.items())
                    raise ConfigError(f"the shards at {location} (identity {manifest.identity}) are not ones the "
                                      f"gallery in {index_dir} was embedded from: {listed}; give those shard folders "
                                      "to --shards.")
                shards = ShardRandomAccess(manifest, source)  # remote shards by index need the node cache, ...
            except (RecogError, OSError, ValueError):
                if location in optional:  # left out: its items' images answer 404
                    continue
                raise
            self.folders[manifest.identity] = (shards, {str(key): i for i, key in enumerate(shards.keys().tolist())})
            self.locations[manifest.identity] = location
        self.missing = [where for identity, where in self.known.items() if identity not in self.folders]
        self.open_all()

    def __len__(self) -> int:
        return sum(len(position) for _, position in self.folders.values())

    def open_all(self) -> None:
        """Open (and, for remote shards, fetch into the cache) every shard now, not from several threads later."""
        for shards, _ in self.folders.values():
            for shard in np.unique(shards.shard).tolist():
                shards.read_bytes(int(np.flatnonzero(shards.shard == shard)[0]))

    def read(self, key: str) -> bytes | None:
        identity, _, key = key.partition(":")
        shards, position = self.folders.get(identity, (None, {}))
        i = position.get(key)
        return None if i is None else shards.read_bytes(i)


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The request's image bytes, from its body or its multipart file field, refused past max_bytes."""
    too_big = BadRequest(413, f"the upload is larger than {max_bytes:,} bytes (--max-mb); send a smaller file.")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes + 65536:  # room for multipart headers
        raise too_big
    body, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes + 65536:
            raise too_big
        body.append(chunk)
    data = b"".join(body)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        data = await form_file(request, data)
    if len(data) > max_bytes:
        raise too_big
    return data


async def form_file(request: Request, body: bytes) -> bytes:
    """The first file field of a multipart form, from the body already read (and bounded) by read_upload."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as e:  # a malformed form: Starlette raises several kinds
        raise BadRequest(400, f"the multipart form could not be read ({str(e)[:80]!r}); send the image as one file "
                              "field (curl -F image=@photo.jpg).") from None
    try:
        uploads = [value for value in form.values() if isinstance(value, UploadFile)]
        if not uploads:
            raise BadRequest(400, "the multipart form holds no file; send the image as a file field "
                                  "(curl -F image=@photo.jpg).")
        return await uploads[0].read()
    finally:
        await form.close()


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal and failure as {"error": one sentence}."""
    @app.exception_handler(BadRequest)
    async def refused(request: Request, e: BadRequest):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, e: StarletteHTTPException):  # an unknown path or method: one sentence too
        what = f"{request.method} {request.url.path[:60]}"
        message = (f"there is no {what}; the endpoints are {ENDPOINTS}." if e.status_code == 404 else
                   f"{what} is refused ({e.detail}); the endpoints are {ENDPOINTS}.")
        return JSONResponse({"error": message}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):  # a bug or a failed batch: logged whole, said in a sentence
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse({"error": f"the service failed on this request ({type(e).__name__}); its log has the "
                                      "details."}, status_code=500)


def create_app(service: Service) -> FastAPI:
    """The endpoints: POST /identify is decode_request -> predict -> encode_response, as LitServe's LitAPI."""
    app = FastAPI(title="recog identify", lifespan=service.lifespan, docs_url=None, redoc_url=None)
    add_error_handlers(app)
    page = files("recog").joinpath(PAGE).read_text()

    async def identify(request: Request):
        """A Starlette route, not a FastAPI one: FastAPI's parameter solving and response encoding took a fifth of
        the event loop's time at 32 clients (py-spy, bench/serve_peers.py); the answer is the same JSON."""
        k = request.query_params.get("k")
        if service.inflight >= service.max_inflight:
            return JSONResponse({"error": f"the service is answering {service.inflight} requests already "
                                          "(--max-inflight); try again shortly."},
                                status_code=503, headers={"Retry-After": "1"})
        service.inflight += 1
        pair = service.pair  # this request's export and index, from decode to answer, whatever a reload does
        try:
            pixels, top, decode_ms = await service.decode_request(request, k, pair)
            return JSONResponse(service.encode_response(await service.predict(pixels, top, pair), decode_ms))
        finally:
            service.inflight -= 1

    app.router.add_route("/identify", identify, methods=["POST"])

    @app.get("/items/{key}/image")
    async def item_image(key: str, request: Request):
        return await service.item_image(key, request.headers.get("if-none-match", ""))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", **service.description, "inflight": service.inflight,
                "max_inflight": service.max_inflight, "served": service.served}

    @app.get("/", response_class=HTMLResponse)
    async def index_page():
        return page

    return app


def etag_matches(if_none_match: str, tag: str) -> bool:
    """Whether an If-None-Match header names `tag` (weakly compared, as RFC 9110 asks for GET), or is `*`."""
    given = [part.strip().removeprefix("W/") for part in if_none_match.split(",")]
    return "*" in given or tag in given


def addresses(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise argparse.ArgumentTypeError(f"{item[:60]!r} is not HOST:PORT (a port from 0 to 65535)")
        out.append((host.strip("[]"), int(port)))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recog.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder written by python -m recog.export")
    p.add_argument("--index", required=True, help="a folder written by python -m recog.index build")
    p.add_argument("--shards", action="extend", nargs="+", metavar="GALLERY_SHARDS",
                   help="the shard folders the gallery was embedded from: GET /items/{key}/image reads them "
                        "(--shards DAY1 DAY2, or --shards once per folder)")
    p.add_argument("--shard-servers", type=addresses, metavar="HOST:PORT,...",
                   help="search the index's shards in their serve-shard processes (one per shard, in order)")
    p.add_argument("--shard-token", help=f"the token the shard servers were started with (default: ${TOKEN_ENV}; "
                                         "the environment keeps it out of the process list)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="0: any free port (the log names it)")
    p.add_argument("-k", type=int, default=5, help="matches per request when it gives no k= (5)")
    p.add_argument("--max-batch", type=int, default=32, help="images per model call (32)")
    # 0, measured (bench/serve.py, 2 cores): as many requests/s as a 5 ms wait at 8 clients (139 and 142), and one
    # client's answers 5 ms sooner (p50 15.2 against 20.3 ms): under load, batches fill while the last one runs
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a batch waits for more requests after its first (0: it takes what has arrived)")
    p.add_argument("--max-inflight", type=int, default=256, help="requests held at once; past it: 503 (256)")
    p.add_argument("--max-mb", type=float, default=20.0, help="largest upload accepted, in MB (20)")
    p.add_argument("--max-pixels", type=int, default=Image.MAX_IMAGE_PIXELS,
                   help="largest image decoded, width × height (default: Pillow's decompression-bomb limit)")
    p.add_argument("--read-timeout-s", type=float, default=30.0,
                   help="an upload that takes longer is refused (408), freeing its in-flight place")
    p.add_argument("--cache-dir", default=os.environ.get("RECOG_CACHE_DIR", "/tmp/recog-cache"),
                   help="where remote (http) --shards are fetched to, as training's data.cache_dir")
    p.add_argument("--decode-threads", type=int, default=0, help="images decoded at once (0: one per core)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the model (0: torch's default)")
    p.add_argument("--device", default="cpu", help="where the model computes: cpu, cuda or cuda:N (decoding and the "
                   "index stay on the CPU)")
    p.add_argument("--batch-threads", type=int, default=0,
                   help="batches computed at once (0: the cores / the torch threads, at least 1)")
    p.add_argument("--grace-s", type=float, default=30.0, help="on SIGTERM, how long requests in flight may take")
    p.add_argument("--access-log", action="store_true", help="log every request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command(lambda: serve(args))


def serve(args: argparse.Namespace) -> None:
    """Load the export and the index, listen, and answer until SIGTERM or Ctrl-C (then exit with status 0)."""
    if FastAPI is None:
        raise ConfigError("recog.serve needs FastAPI and uvicorn: pip install -e '.[serve]'.")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which of its builds it loaded
    # Pillow's bomb check follows --max-pixels; it only warns between its limit and twice it: here that is a 413
    Image.MAX_IMAGE_PIXELS = args.max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    # a SIGHUP while the pair loads (it may have read the files before they changed): noted, and a reload once the
    # event loop runs and takes SIGHUP over (Reloader.start); the handler does nothing else
    early = EARLY_SIGHUPS  # those that came while this module loaded, if it runs as the program
    signal.signal(signal.SIGHUP, lambda number, frame: early.append(number))
    service = Service(args.model, args.index, args.shards, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      max_inflight=args.max_inflight, max_bytes=int(args.max_mb * (1 << 20)),
                      max_pixels=args.max_pixels, default_k=args.k, read_timeout_s=args.read_timeout_s,
                      cache_dir=args.cache_dir, decode_threads=args.decode_threads, batch_threads=args.batch_threads,
                      shard_servers=args.shard_servers, shard_token=args.shard_token or os.environ.get(TOKEN_ENV),
                      device=args.device)
    service.reloader.early = early
    sock = bind(args.host, args.port)
    log_what_is_served(service, args, sock)
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=args.access_log,
                            timeout_graceful_shutdown=args.grace_s, lifespan="on")
    # uvicorn finishes the requests in flight on SIGTERM/SIGINT, then raises the signal again for the handler it
    # found: this one, so that a clean stop exits with status 0 rather than dying of the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: None)
    uvicorn.Server(config).run(sockets=[sock])


def log_what_is_served(service: Service, args: argparse.Namespace, sock) -> None:
    d = service.description
    log.info("model %s: sha256 %s, %d-d embeddings of %d×%d px, %d channel(s)", service.pair.embedder.folder,
             d["model_sha256"], d["embedding_dim"], d["input"]["size"], d["input"]["size"], d["input"]["channels"])
    log.info("index %s (generation %d): %s (%s), %s vectors in %d shard(s)%s%s", service.pair.gallery.info.folder,
             d["index_generation"], d["index"]["kind"],
             d["index"]["factory"], f"{d['index']['count']:,}", d["index"]["shards"],
             f" searched by {', '.join(d['index']['shard_servers'])}" if args.shard_servers else "",
             f"; gallery images from {', '.join(args.shards)} ({len(service.items):,} items"
             f"{'; none from ' + ', '.join(service.items.missing) if service.items.missing else ''})"
             if service.items else "; no gallery images (no --shards)")
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (batches of up to %d, %g ms wait, %d at once on %d torch thread(s) each; "
             "%d requests in flight at most; kill -HUP %d reloads the export and the index)", host, port,
             args.max_batch, args.max_wait_ms, service.batcher.workers, torch.get_num_threads(), args.max_inflight,
             os.getpid())


if __name__ == "__main__":
    sys.exit(main())
