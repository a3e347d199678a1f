"""One shard of an index held by its own process (`serve-shard`), and the client that searches every shard's server
and merges the answers as one index (`recog.gallery.open_gallery(folder, shard_servers=...)`, recog.serve
--shard-servers).

    python -m recog.index serve-shard INDEX_DIR --shard I [--host 127.0.0.1] [--port P] [--token T]

The protocol is HTTP/1.1 carrying JSON and raw little-endian numbers, nothing that runs code when it is read:

    GET  /describe             -> {"model_sha256", "generation", "shard", "file", "count", "dim"}
    POST /search?k=K&dim=D     a body of n×D float32 queries (n from 1 to MAX_QUERIES, Content-Length n·D·4)
                               -> n×K float32 scores, then n×K int64 ids (-1: no match), the shard's own ids
    a refusal                  -> 4xx {"error": one sentence}; a failure of the server -> 500, its log has the rest

No traceback or path of the server's machine is sent, and requests are bounded (k up to MAX_K, n up to
MAX_QUERIES, D the shard's width, at most MAX_CONNECTIONS connections, SOCKET_TIMEOUT_S for every read). It listens
on 127.0.0.1 by default; on any other address it needs a shared token (--token or RECOG_SHARD_TOKEN), which every
request carries as `Authorization: Bearer TOKEN` and the server compares in constant time (401 otherwise).

Why the standard library's `http.server.ThreadingHTTPServer` and `http.client`: a shard machine needs faiss and
numpy only (the `identify` extra), not the web framework of recog.serve; faiss's search blocks, so a thread per
connection is its natural shape; and the parsing of requests and answers is a well-worn HTTP stack's, not ours.
The client keeps one keep-alive connection per shard, with a timeout, so a dead server is an error, not a wait.
"""

from __future__ import annotations

import argparse
import hmac
import http.client
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.pool import ThreadPool
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from recog.errors import ConfigError, DataError
from recog.index_files import IndexInfo, import_faiss, open_shard, read_generation, read_index_info
from recog.listen import bind

log = logging.getLogger("recog.shard_server")

TOKEN_ENV = "RECOG_SHARD_TOKEN"
MAX_K = 1024  # faiss's GPU indexes stop at 2048; recog.serve asks for at most 100
MAX_QUERIES = 1024  # queries per request: the client sends larger batches in pieces
MAX_CONNECTIONS = 64  # threads serving connections at once; past it a connection is answered 503 and closed
SOCKET_TIMEOUT_S = 60.0  # a client that stalls mid-request, or a keep-alive connection idle that long, is dropped
MAX_JSON_BYTES = 1 << 16  # the longest /describe or error answer the client reads
LINGER_S, LINGER_BYTES = 2.0, 64 << 20  # after a refusal: how long, and how much, of the unread request is read
TOKEN = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII: sent in an HTTP header as it is
NUMBER = re.compile(r"[0-9]{1,9}")
ENDPOINTS = "GET /describe and POST /search?k=K&dim=D"


def port_number(text: str) -> int:
    """argparse's type for --port: a TCP port (0: any free one), or one sentence."""
    if not NUMBER.fullmatch(text) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a port number; give 0 to 65535 (0: any free port)")
    return int(text)


def check_token(token: str | None, where: str) -> str | None:
    """The shared token, or None when none is given; one sentence if it cannot travel in an HTTP header."""
    if not token:
        return None
    if not TOKEN.fullmatch(token):
        raise ConfigError(f"the shard token ({where}) must be 1 to 256 visible ASCII characters without spaces; "
                          "give another one (e.g. python -c 'import secrets; print(secrets.token_urlsafe())').")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may name any interface
        return False


class Refused(Exception):
    """A request the shard server refuses: its HTTP status and one sentence for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Shard:
    """The faiss index of one shard and what /describe says of it."""

    def __init__(self, index, described: dict, token: str | None):
        self.index, self.described, self.token = index, described, token
        self.dim = described["dim"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)


class ShardHandler(BaseHTTPRequestHandler):
    """One connection's requests (keep-alive), answered from `shard`."""

    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S  # every read on the connection, the wait for its next request included
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle would hold the body for a delayed ACK

    def __init__(self, *args, shard: Shard, **kwargs):
        self.shard = shard
        super().__init__(*args, **kwargs)

    def version_string(self) -> str:
        return "recog-shard"  # no Python version for the client

    def log_message(self, format, *args) -> None:
        pass  # a line per request otherwise; failures are logged where they happen

    def do_GET(self) -> None:
        self.serve("GET")

    def do_POST(self) -> None:
        self.serve("POST")

    def serve(self, method: str) -> None:
        try:
            self.check_token()
            url = urlsplit(self.path)
            if url.path == "/describe" and method == "GET":
                self.answer(200, json.dumps(self.shard.described).encode(), "application/json")
            elif url.path == "/search" and method == "POST":
                self.answer(200, self.search(parse_qs(url.query)), "application/octet-stream")
            elif url.path in ("/describe", "/search"):
                raise Refused(405, f"{method} {url.path} is not an endpoint; the endpoints are {ENDPOINTS}.")
            else:
                raise Refused(404, f"there is no {method} {url.path[:60]!r}; the endpoints are {ENDPOINTS}.")
        except Refused as e:
            self.refuse(e.status, e.message)
        except Exception as e:  # a bug: the whole of it in this server's log, a sentence for the client
            log.exception("%s %s failed", method, self.path[:100])
            self.refuse(500, f"the shard server failed on this request ({type(e).__name__}); its log has the "
                             "details.")

    def check_token(self) -> None:
        if self.shard.token is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        # constant time: how much of a guess was right must not show in how long the refusal took
        if scheme != "Bearer" or not hmac.compare_digest(token.encode("latin-1"), self.shard.token.encode()):
            what = "a wrong one was given" if given else "none was given"
            raise Refused(401, f"this shard server wants its shared token ({what}); start recog.serve with "
                               f"--shard-token or {TOKEN_ENV} set to the token serve-shard was started with.")

    def search(self, query: dict[str, list[str]]) -> bytes:
        k = self.whole_number(query, "k", 1, MAX_K)
        dim = self.whole_number(query, "dim", 1, 1 << 20)
        if dim != self.shard.dim:
            raise Refused(400, f"dim={dim} is not the width of this shard's vectors ({self.shard.dim}); search it "
                               "with queries of the index's model.")
        length = self.headers.get("Content-Length", "")
        if "Transfer-Encoding" in self.headers or not NUMBER.fullmatch(length):
            raise Refused(411, "the request gives no Content-Length; send the queries as one body of known length.")
        rows, rest = divmod(int(length), 4 * dim)
        if rest or rows == 0:
            raise Refused(400, f"the body holds {int(length):,} bytes, not a whole number of {dim}-float32 queries "
                               f"({4 * dim} bytes each); send n×{dim} little-endian float32 values.")
        if rows > MAX_QUERIES:
            raise Refused(413, f"the body holds {rows:,} queries, more than the {MAX_QUERIES} a request may carry; "
                               "send them in smaller batches.")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            raise Refused(408, f"the body did not arrive within {SOCKET_TIMEOUT_S:g} s; send it again.") from None
        if len(body) != int(length):
            raise Refused(400, "the body ended before its Content-Length; send the whole body.")
        queries = np.frombuffer(body, dtype="<f4").reshape(rows, dim).astype(np.float32)
        if not np.isfinite(queries).all():
            raise Refused(400, "the queries hold NaN or infinite values; send finite float32 values.")
        scores, ids = self.shard.search(queries, k)
        return scores.astype("<f4").tobytes() + ids.astype("<i8").tobytes()

    @staticmethod
    def whole_number(query: dict[str, list[str]], name: str, low: int, high: int) -> int:
        values = query.get(name, [])
        if len(values) != 1 or not NUMBER.fullmatch(values[0]) or not low <= int(values[0]) <= high:
            raise Refused(400, f"{name}={values[0][:20] if values else ''!r} is not a whole number from {low} to "
                               f"{high}; give one {name}= in that range.")
        return int(values[0])

    def refuse(self, status: int, message: str) -> None:
        # the connection is closed after every refusal: the body of a refused request may not have been read
        self.answer(status, json.dumps({"error": message}).encode(), "application/json", close=True)
        self.linger = True

    def finish(self) -> None:
        """After a refusal, read (and drop) what the client still sends before closing: closing a socket with unread
        data resets the connection, and the reset can reach the client before the refusal it should read."""
        super().finish()
        if not getattr(self, "linger", False):
            return
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            deadline, read = time.monotonic() + LINGER_S, 0
            while read < LINGER_BYTES and time.monotonic() < deadline:
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                read += len(chunk)
        except OSError:  # the client closed or went quiet: either way, done
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a request that is not HTTP, headers too long, an unknown method): JSON too."""
        phrase = http.client.responses.get(code, "refused")
        self.request_version = "HTTP/1.1"  # a line it could not read counts as HTTP/0.9, answered without a status
        self.refuse(code, f"the request is not one this shard server reads ({code} {phrase}); speak HTTP to its "
                          f"endpoints, {ENDPOINTS}.")

    def answer(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client went away
            self.close_connection = True


class ShardHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on a socket bound by recog.listen.bind, at most MAX_CONNECTIONS connections at once."""

    daemon_threads = True
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: 96\r\n\r\n"
            + json.dumps({"error": f"the shard server holds {MAX_CONNECTIONS} connections already; try again "
                                   "shortly."}).encode().ljust(96))

    def __init__(self, sock, handler):
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(self.BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve_shard(folder: str | Path, number: int, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                log=print) -> None:
    """Hold shard `number` of the index in `folder` and answer searches on host:port until killed. Any address
    but the loopback needs `token`, which every request must then carry."""
    token = check_token(token, "--token")
    if token is None and not is_loopback(host):
        raise ConfigError(f"serve-shard would listen on {host}, beyond this machine, with no shared token; set "
                          f"{TOKEN_ENV} (or --token) and give recog.serve the same (--shard-token), or listen on "
                          "127.0.0.1.")
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is not a port number; give 0 to 65535 (0: any free port).")
    info = read_index_info(folder)
    if not 0 <= number < len(info.raw["shards"]):
        raise ConfigError(f"the index in {folder} has {len(info.raw['shards'])} shard(s), numbered from 0; "
                          f"--shard {number} is not one of them.")
    info, index = read_generation(folder, lambda info: (info, open_shard(info, number)))
    described = {"model_sha256": info.model_sha256, "generation": info.raw["generation"], "shard": number,
                 "file": info.raw["shards"][number], "count": int(index.ntotal), "dim": info.dim}
    server = ShardHTTPServer(bind(host, port), partial(ShardHandler, shard=Shard(index, described, token)))
    bound = server.socket.getsockname()
    log(f"shard {number} of {info.folder} ({described['file']}, {index.ntotal:,} vectors): listening on "
        f"{bound[0]}:{bound[1]}{' (token required)' if token else ''}")
    server.serve_forever()


class ShardUnreachable(Exception):
    """A shard server that did not answer in this protocol: why, in a few words (never the answer's bytes)."""


class ShardClient:
    """One shard server's keep-alive connection, one request at a time."""

    def __init__(self, host: str, port: int, token: str | None, timeout_s: float):
        self.address, self.timeout_s = f"{host}:{port}", timeout_s
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
        self.lock = threading.Lock()
        self.reused = False  # a kept-alive connection the server may have closed since: one retry on a new one

    def request(self, method: str, path: str, body: bytes | None, limit: int) -> tuple[int, str, bytes]:
        """(status, content type, body of at most `limit` bytes), or ShardUnreachable."""
        with self.lock:
            for retry in (False, True):
                try:
                    return self._exchange(method, path, body, limit)
                except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
                    self.connection.close()
                    reused, self.reused = self.reused, False
                    if retry or not reused:
                        raise ShardUnreachable("it closed the connection") from e
                except TimeoutError:
                    self.connection.close()
                    self.reused = False
                    raise ShardUnreachable(f"it did not answer within {self.timeout_s:g} s") from None
                except OSError as e:
                    self.connection.close()
                    self.reused = False
                    raise ShardUnreachable(e.strerror or type(e).__name__) from None
                except http.client.HTTPException as e:  # not HTTP: never quote what came back
                    self.connection.close()
                    self.reused = False
                    raise ShardUnreachable(f"its answer is not HTTP ({type(e).__name__})") from None
        raise AssertionError("unreachable")

    def _exchange(self, method: str, path: str, body: bytes | None, limit: int) -> tuple[int, str, bytes]:
        self.connection.request(method, path, body=body, headers=self.headers)
        response = self.connection.getresponse()
        data = response.read(limit + 1)
        if len(data) > limit:
            self.connection.close()
            self.reused = False
            raise ShardUnreachable(f"its answer is longer than the {limit:,} bytes expected")
        if response.will_close or not response.isclosed():  # the server ends the connection, or sent more
            self.connection.close()
        self.reused = not response.will_close
        return response.status, response.getheader("Content-Type", ""), data

    @staticmethod
    def error_of(data: bytes) -> str:
        """The sentence of an error answer, shortened, or a note that there was none."""
        try:
            error = json.loads(data)["error"]
        except (ValueError, TypeError, KeyError, RecursionError):
            return "no error sentence"
        return str(error)[:200] if isinstance(error, str) else "no error sentence"


class RemoteShards:
    """An index's shards searched by their servers (`serve-shard`), one thread per shard, merged per query: the k
    largest scores, each shard's ids offset by the sizes of the shards before it, as faiss.IndexShards does."""

    def __init__(self, info: IndexInfo, addresses: list[tuple[str, int]], token: str | None = None,
                 timeout_s: float = 60.0):
        token = check_token(token, f"--shard-token or {TOKEN_ENV}")
        self.folder = info.folder
        if len(addresses) != len(info.raw["shards"]):
            raise ConfigError(f"the index in {info.folder} has {len(info.raw['shards'])} shard(s) and "
                              f"{len(addresses)} shard server(s) were given; give one per shard, in shard order.")
        self.clients, self.sizes = [], []
        for number, (host, port) in enumerate(addresses):
            client = ShardClient(host, port, token, timeout_s)
            start = f"start python -m recog.index serve-shard {info.folder} --shard {number} there"
            try:
                status, kind, data = client.request("GET", "/describe", None, MAX_JSON_BYTES)
            except ShardUnreachable as e:
                raise ConfigError(f"the shard server at {client.address} cannot be reached or does not speak "
                                  f"recog's shard protocol ({e}); {start}.") from None
            if status == 401:
                raise ConfigError(f"the shard server at {client.address} refused {'the' if token else 'a missing'} "
                                  f"token; give --shard-token or {TOKEN_ENV} the token its serve-shard was started "
                                  "with.")
            described = self.description(status, kind, data)
            if described is None:
                raise ConfigError(f"the shard server at {client.address} does not answer as a recog shard server "
                                  f"({status}: {client.error_of(data)}); {start}.")
            wanted = {"model_sha256": info.model_sha256, "generation": info.raw["generation"], "shard": number,
                      "file": info.raw["shards"][number], "dim": info.dim}
            if {key: described.get(key) for key in wanted} != wanted:
                serves = f"shard {str(described.get('shard'))[:20]} ({str(described.get('file'))[:80]})"
                raise ConfigError(f"the shard server at {client.address} serves {serves}, not shard {number} "
                                  f"({wanted['file']}) of this index; give the servers in shard order, each started "
                                  "on this index.")
            self.clients.append(client)
            self.sizes.append(described["count"])
        self.dim = info.dim
        self.offsets = np.cumsum([0, *self.sizes[:-1]])
        self.ntotal = int(sum(self.sizes))
        self.pool = ThreadPool(len(self.clients))

    @staticmethod
    def description(status: int, kind: str, data: bytes) -> dict | None:
        """/describe's answer, if it is one: JSON, a count among its fields."""
        if status != 200 or not kind.startswith("application/json"):
            return None
        try:
            described = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(described, dict) or type(described.get("count")) is not int or described["count"] < 0:
            return None
        return described

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        if not 1 <= k <= MAX_K:
            raise ConfigError(f"k={k}: shard servers give 1 to {MAX_K} matches per query; ask for fewer.")
        queries = np.ascontiguousarray(queries, dtype="<f4")
        found_scores, found_ids = [np.empty((0, k), np.float32)], [np.empty((0, k), np.int64)]
        for start in range(0, len(queries), MAX_QUERIES):
            piece = queries[start : start + MAX_QUERIES]
            merged = faiss.ResultHeap(len(piece), k, keep_max=True)  # inner products: the largest are the nearest
            answers = self.pool.map(partial(self.search_shard, queries=piece, k=k), range(len(self.clients)))
            for (scores, ids), offset in zip(answers, self.offsets):
                merged.add_result(scores, np.where(ids >= 0, ids + offset, -1))
            merged.finalize()
            found_scores.append(merged.D)
            found_ids.append(merged.I)
        return np.concatenate(found_scores), np.concatenate(found_ids)

    def search_shard(self, number: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        client, size = self.clients[number], len(queries) * k
        try:
            status, kind, data = client.request("POST", f"/search?k={k}&dim={self.dim}", queries.tobytes(),
                                                max(12 * size, MAX_JSON_BYTES))
        except ShardUnreachable as e:
            raise DataError(f"the shard server at {client.address} failed to answer a search ({e}); restart python "
                            f"-m recog.index serve-shard {self.folder} --shard {number} there.") from None
        if status == 401:
            raise ConfigError(f"the shard server at {client.address} refused the token; give --shard-token or "
                              f"{TOKEN_ENV} the token its serve-shard was started with.")
        if status != 200 or len(data) != 12 * size:
            raise DataError(f"the shard server at {client.address} refused a search ({status}: "
                            f"{client.error_of(data)}); check that it runs this version of recog on this index.")
        scores = np.frombuffer(data, dtype="<f4", count=size).reshape(len(queries), k).astype(np.float32)
        ids = np.frombuffer(data, dtype="<i8", offset=4 * size).reshape(len(queries), k).astype(np.int64)
        if not ((ids >= -1) & (ids < self.sizes[number])).all():
            raise DataError(f"the shard server at {client.address} answered ids outside its {self.sizes[number]:,} "
                            "vectors; restart it on this index.")
        return scores, ids
