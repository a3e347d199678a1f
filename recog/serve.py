"""Identify over HTTP: what `recog.identify` answers, for many clients at once, and a page to try it on.

    python -m recog.serve --model EXPORT_DIR --index INDEX_DIR [--shards GALLERY_SHARDS] [--port 8000]

    POST /identify?k=5        an image, as the request body or a multipart file field -> {"vote", "matches":
                              [{"key", "label", "class", "score"}, ...], "timing_ms": {"decode", "model",
                              "search"}, "batch"}: recog.identify --json's fields, and where the time went
    GET  /items/{key}/image   a gallery item's image, read from --shards (the shards the gallery was embedded from);
                              revalidated by its ETag (a rebuilt gallery may give a key another image)
    GET  /healthz             what is served, and the requests in flight
    GET  /                    a page: choose or drop a photo, see its nearest gallery items

Concurrent requests are embedded and searched together: a batch is every image that arrived while the previous
batch ran, up to --max-batch (--max-wait-ms > 0 also waits that long after a batch's first image for more). At
most --max-inflight requests are held at once; past that the answer is 503 at once (a client retries, a load
balancer tries another replica) instead of a queue that grows without end. Bad input is a 4xx with {"error": one
sentence}, and the next request is served as if it had not happened. SIGTERM: no new connections, the requests
in flight are finished (at most --grace-s seconds), then the process exits with status 0.

One process serves one export and one index, loaded once: all its shards, or (--shard-servers) none of them, each
searched by its own `python -m recog.index serve-shard` process, on any machine (recog.shard_server; with
--shard-token or RECOG_SHARD_TOKEN when the servers want one). More traffic: more replicas behind a load balancer
(README, "Serve").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import signal
import sys
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
from recog.errors import ConfigError
from recog.exported import ExportedEmbedder
from recog.gallery import open_gallery
from recog.identify import answer, check_match, gallery_class_names
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


class Batcher:
    """Requests' images embedded and searched together. A batch is every query waiting when the last one ended, up
    to `max_batch` (and, with `max_wait_s` > 0, those arriving that long after its first). It runs on one thread
    (the model and faiss use their own threads inside), while the event loop takes requests for the next batch."""

    def __init__(self, compute, max_batch: int, max_wait_s: float):
        self.compute, self.max_batch, self.max_wait_s = compute, max_batch, max_wait_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="recog-batch")
        self.queue: asyncio.Queue[Query] | None = None
        self.task: asyncio.Task | None = None

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
        await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, pixels: torch.Tensor, k: int):
        loop = asyncio.get_running_loop()
        if self.task.done():
            raise RuntimeError("the batcher stopped")
        query = Query(pixels, k, loop.create_future(), loop.time())
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
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.compute, batch)
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


class Service:
    """An export and an index, loaded once; optionally the gallery's shards, to show the matches' images."""

    def __init__(self, model_dir: str, index_dir: str, shards: list[str] | str | None = None, *, max_batch: int = 32,
                 max_wait_ms: float = 0.0, max_inflight: int = 256, max_bytes: int = 20 << 20,
                 max_pixels: int = Image.MAX_IMAGE_PIXELS, default_k: int = 5, read_timeout_s: float = 30.0,
                 cache_dir: str | None = None, decode_threads: int = 0,
                 shard_servers: list[tuple[str, int]] | None = None, shard_token: str | None = None):
        for name, value in (("--max-batch", max_batch), ("--max-inflight", max_inflight), ("-k", default_k)):
            if value < 1:
                raise ConfigError(f"{name} {value} must be 1 or more.")
        self.embedder, self.gallery = ExportedEmbedder(model_dir), open_gallery(index_dir, shard_servers, shard_token)
        check_match(self.embedder, self.gallery, model_dir, index_dir)
        self.classes = gallery_class_names(self.embedder, self.gallery)
        if isinstance(shards, str):
            shards = [shards]
        self.items = GalleryImages(shards, self.gallery.info.sources, cache_dir, index_dir) if shards else None
        self.max_k = min(MAX_K, self.gallery.info.count)
        self.default_k = min(default_k, self.max_k)
        self.max_inflight, self.max_bytes, self.max_pixels = max_inflight, max_bytes, max_pixels
        self.read_timeout_s = read_timeout_s
        self.inflight, self.served = 0, 0
        # images decoded at once (a decoded image at the pixel limit takes hundreds of MB): one per core by default
        self.decoding = asyncio.Semaphore(decode_threads or os.cpu_count() or 1)
        self.batcher = Batcher(self.compute, max_batch, max_wait_ms / 1000)
        params = self.gallery.info.raw["params"]
        self.description = {
            "model_sha256": self.embedder.sha256, "embedding_dim": self.embedder.dim,
            "input": {"channels": self.embedder.channels, "size": self.embedder.size},
            "index": {"kind": params["kind"], "factory": params["factory"], "count": self.gallery.info.count,
                      "shards": len(self.gallery.info.raw["shards"]),
                      "shard_servers": [f"{host}:{port}" for host, port in shard_servers or []]},
            "gallery_images": self.items is not None, "classes": self.classes, "max_k": self.max_k,
            "default_k": self.default_k,
        }

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
        return [{**a, "timing_ms": dict(timing), "batch": len(batch)} for a in answers]

    def decode(self, data: bytes) -> torch.Tensor:
        return decode_upload(data, self.embedder.channels, self.embedder.preprocess, self.max_pixels)

    @asynccontextmanager
    async def lifespan(self, app):
        self.batcher.start()
        yield
        await self.batcher.stop()
        log.info("stopped after %d requests answered", self.served)

    async def decode_request(self, request: Request, k: str | None) -> tuple[torch.Tensor, int, float]:
        """POST /identify's request -> the model's input, the matches asked for, and the decode's milliseconds."""
        top = parse_k(k, self.default_k, self.max_k)
        try:
            data = await asyncio.wait_for(read_upload(request, self.max_bytes), self.read_timeout_s)
        except asyncio.TimeoutError:
            raise BadRequest(408, f"the upload took longer than {self.read_timeout_s:g} s (--read-timeout-s); send "
                                  "it again.") from None
        except ClientDisconnect:
            raise BadRequest(400, "the client went away before its upload ended.") from None
        async with self.decoding:
            started = time.perf_counter()
            pixels = await run_in_threadpool(self.decode, data)
            decoded = time.perf_counter()
        return pixels, top, round(1000 * (decoded - started), 3)

    async def predict(self, pixels: torch.Tensor, k: int) -> dict:
        """Embedded and searched with the other requests of its batch (compute)."""
        return await self.batcher.submit(pixels, k)

    def encode_response(self, result: dict, decode_ms: float) -> dict:
        result["timing_ms"]["decode"] = decode_ms
        self.served += 1
        return result

    async def item_image(self, key: str, if_none_match: str) -> Response:
        """GET /items/{key}/image: the gallery item's encoded image, or 304 when the client's copy is current."""
        if self.items is None:
            raise BadRequest(404, "this service was started without --shards, so it serves no gallery images; "
                                  "start it with --shards GALLERY_SHARDS.")
        data = await run_in_threadpool(self.items.read, key)
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
    gallery was embedded from (its identity, a hash of its shard list, is in the index's sources)."""

    def __init__(self, locations: list[str], sources: list[dict], cache_dir: str | None = None,
                 index_dir: str = "the index"):
        if not sources:
            raise ConfigError(f"{index_dir} does not record which shard folders its items come from (it was built "
                              "from embeddings of another tool or an older recog); build it again from "
                              "python -m recog.embed's embeddings to show its images, or leave out --shards.")
        source, known = ShardSource(cache_dir=cache_dir), {s["identity"]: s["location"] for s in sources}
        self.folders = {}
        for location in locations:
            manifest = load_manifest(location, source)
            if manifest.identity not in known:
                listed = ", ".join(f"{where} ({identity})" for identity, where in known.items())
                raise ConfigError(f"the shards at {location} (identity {manifest.identity}) are not ones the gallery "
                                  f"in {index_dir} was embedded from: {listed}; give those shard folders to --shards.")
            shards = ShardRandomAccess(manifest, source)
            self.folders[manifest.identity] = (shards, {str(key): i for i, key in enumerate(shards.keys().tolist())})
        self.missing = [where for identity, where in known.items() if identity not in self.folders]
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

    @app.post("/identify")
    async def identify(request: Request, k: str | None = None):
        if service.inflight >= service.max_inflight:
            return JSONResponse({"error": f"the service is answering {service.inflight} requests already "
                                          "(--max-inflight); try again shortly."},
                                status_code=503, headers={"Retry-After": "1"})
        service.inflight += 1
        try:
            pixels, top, decode_ms = await service.decode_request(request, k)
            return service.encode_response(await service.predict(pixels, top), decode_ms)
        finally:
            service.inflight -= 1

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
    p.add_argument("--shards", action="append", metavar="GALLERY_SHARDS",
                   help="a shard folder the gallery was embedded from: GET /items/{key}/image reads it (give "
                        "--shards once per folder)")
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
    service = Service(args.model, args.index, args.shards, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      max_inflight=args.max_inflight, max_bytes=int(args.max_mb * (1 << 20)),
                      max_pixels=args.max_pixels, default_k=args.k, read_timeout_s=args.read_timeout_s,
                      cache_dir=args.cache_dir, decode_threads=args.decode_threads,
                      shard_servers=args.shard_servers, shard_token=args.shard_token or os.environ.get(TOKEN_ENV))
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
    log.info("model %s: sha256 %s, %d-d embeddings of %d×%d px, %d channel(s)", Path(args.model).resolve(),
             d["model_sha256"], d["embedding_dim"], d["input"]["size"], d["input"]["size"], d["input"]["channels"])
    log.info("index %s: %s (%s), %s vectors in %d shard(s)%s%s", Path(args.index).resolve(), d["index"]["kind"],
             d["index"]["factory"], f"{d['index']['count']:,}", d["index"]["shards"],
             f" searched by {', '.join(d['index']['shard_servers'])}" if args.shard_servers else "",
             f"; gallery images from {', '.join(args.shards)} ({len(service.items):,} items"
             f"{'; none from ' + ', '.join(service.items.missing) if service.items.missing else ''})"
             if service.items else "; no gallery images (no --shards)")
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (batches of up to %d, %g ms wait, %d requests in flight at most)",
             host, port, args.max_batch, args.max_wait_ms, args.max_inflight)


if __name__ == "__main__":
    sys.exit(main())
