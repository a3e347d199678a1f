"""python -m recog.index serve-shard, started for real on this machine, and the client that searches it
(recog.shard_server): the pickles that ran code through faiss's RPC (sent to a server, and answered by a fake one)
run nothing; a bind beyond the loopback needs a token, and a wrong one is one sentence; bad requests get one
sentence each and the server goes on; a server that never answers is an error, not a hang."""

from __future__ import annotations

import http.client
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import ROOT
from identify_setup import clustered, run_module, write_embeddings

from recog.errors import ConfigError
from recog.gallery import open_gallery
from recog.index import build, main
from recog.index_files import read_index_info
from recog.shard_server import MAX_QUERIES, TOKEN_ENV, RemoteShards

DIM = 32


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> dict:
    """2,000 vectors in a flat index of 2 shards, and 40 queries."""
    root = tmp_path_factory.mktemp("shards")
    vectors, queries = np.split(clustered(2040, dim=DIM, seed=7), [2000])
    build(write_embeddings(root / "emb", vectors, part_size=1000), root / "index", kind="flat", shards=2,
          log=lambda line: None)
    return {"index": root / "index", "queries": queries}


class ShardProcess:
    """`python -m recog.index serve-shard` as a user starts it, on --port 0; `port` from its log."""

    def __init__(self, index, number: int, *args: str, env: dict | None = None):
        command = [sys.executable, "-m", "recog.index", "serve-shard", str(index), "--shard", str(number),
                   "--port", "0", *args]
        env = {**{name: value for name, value in os.environ.items() if name != TOKEN_ENV}, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT), **(env or {})}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, cwd=ROOT)
        self.lines = []
        for line in self.process.stdout:  # until it listens (or exits)
            self.lines.append(line)
            if found := re.search(r"listening on (\S+):(\d+)", line):
                self.port = int(found.group(2))
                return
        self.process.wait(30)
        raise RuntimeError("serve-shard did not start:\n" + "".join(self.lines))

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


@pytest.fixture
def shard_servers(gallery):
    """Start serve-shard processes on the gallery's index (stopped at the test's end)."""
    started = []

    def start(number: int, *args: str, env: dict | None = None) -> ShardProcess:
        started.append(ShardProcess(gallery["index"], number, *args, env=env))
        return started[-1]

    yield start
    for server in started:
        server.stop()


class Write:
    """numpy.savetxt writing a pickle that runs `touch MARKER` into `path`: half of the reported exploit, which
    faiss's restricted unpickler (any numpy attribute allowed) let through."""

    def __init__(self, path, marker):
        self.path, self.marker = str(path), str(marker)

    def __reduce__(self):
        return np.savetxt, (self.path, [[0]], "%d", " ", "\n", f"cos\nsystem\n(S'touch {self.marker}'\ntR.", "", "")


class Load:
    """numpy.load(path, None, True): the other half, which unpickles the file just written."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return np.load, (self.path, None, True)


def exploit(tmp_path) -> bytes:
    """The raw pickle of faiss's RPC call ("describe", (Write, Load)): it touches tmp_path/marker when unpickled."""
    return pickle.dumps(("describe", (Write(tmp_path / "payload", tmp_path / "marker"), Load(tmp_path / "payload"))))


def raw_exchange(address: tuple[str, int], data: bytes, timeout: float = 60) -> bytes:
    """Send `data` on a new connection, read until the server closes it."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def one_sentence(error: str) -> bool:
    return error.endswith(".") and ". " not in error and "\n" not in error and "Traceback" not in error


def check_refusal(status: int, body: bytes, want_status: int, phrase: str, index) -> None:
    assert status == want_status, (status, body)
    error = json.loads(body)["error"]
    assert phrase in error and one_sentence(error), error
    assert str(index) not in error and str(ROOT) not in error, error  # no path of the server's machine


def assert_same_results(remote, local, queries, k: int = 10) -> None:
    want_scores, want_ids = local.search(queries, k)
    got_scores, got_ids = remote.search(queries, k)
    assert (got_ids == want_ids).all() and want_ids.max() >= 1000  # the second shard's ids are offset too
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-6)


@pytest.mark.slow  # starts two shard-server processes
def test_the_rpc_pickle_sent_to_a_shard_server_runs_nothing_and_searches_go_on(gallery, shard_servers, tmp_path):
    """The reported exploit, byte for byte as faiss's RPC client sent it: the server reads it as a request that is
    not HTTP, answers one sentence and closes; nothing is written, and the next search is answered."""
    servers = [shard_servers(0), shard_servers(1)]
    payload = exploit(tmp_path)
    answer = raw_exchange(servers[0].address, payload)
    assert not (tmp_path / "marker").exists() and not (tmp_path / "payload").exists()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    check_refusal(400, body, 400, "not one this shard server reads", gallery["index"])
    # the same bytes as a request's body: a search of the wrong length
    connection = http.client.HTTPConnection(*servers[0].address, timeout=60)
    connection.request("POST", f"/search?k=5&dim={DIM}", body=payload + (b"" if len(payload) % (4 * DIM) else b"\0"))
    response = connection.getresponse()
    check_refusal(response.status, response.read(), 400, "not a whole number", gallery["index"])
    assert not (tmp_path / "marker").exists()
    assert all(server.process.poll() is None for server in servers)
    remote = open_gallery(gallery["index"], shard_servers=[server.address for server in servers])
    assert_same_results(remote, open_gallery(gallery["index"]), gallery["queries"])


class FakeShardServer:
    """A server on 127.0.0.1 that answers every request with `answer`: raw bytes on the socket (as faiss's RPC
    server answers), or an HTTP 200 whose body they are."""

    def __init__(self, answer: bytes, http_framing: bool):
        self.answer = answer
        if http_framing:
            fake = self

            class Handler(BaseHTTPRequestHandler):
                def do_GET(self):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(fake.answer)))
                    self.end_headers()
                    self.wfile.write(fake.answer)

                def log_message(self, *args):
                    pass

            self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.address = self.server.server_address[:2]
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
        else:
            self.server = None
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.address = self.listener.getsockname()[:2]
            threading.Thread(target=self.raw, daemon=True).start()

    def raw(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                try:
                    conn.recv(65536)  # the request, whatever it is
                    conn.sendall(self.answer)
                    conn.recv(65536)  # until the client closes
                except OSError:
                    pass

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
        else:
            self.listener.close()


@pytest.mark.parametrize("framing", ["raw, as faiss's RPC answers", "as an HTTP body"])
def test_a_fake_shard_server_answering_the_rpc_pickle_runs_nothing_in_the_client(gallery, tmp_path, framing):
    """recog.serve --shard-servers (open_gallery's client) asks a fake shard server, which answers with the exploit:
    nothing is unpickled, nothing written; one sentence names the server and the fix."""
    fake = FakeShardServer(exploit(tmp_path), http_framing=framing.startswith("as an HTTP"))
    try:
        with pytest.raises(ConfigError) as refused:
            open_gallery(gallery["index"], shard_servers=[fake.address, fake.address])
    finally:
        fake.stop()
    assert not (tmp_path / "marker").exists() and not (tmp_path / "payload").exists()
    message = str(refused.value)
    assert f"{fake.address[0]}:{fake.address[1]}" in message and "serve-shard" in message and one_sentence(message)


def test_the_client_gives_up_on_a_shard_server_that_never_answers(gallery):
    """A server that accepts the connection and then says nothing (hung, or not a shard server): an error after
    the client's timeout, not a wait forever."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    address = listener.getsockname()[:2]
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match="did not answer within 1 s"):
            RemoteShards(read_index_info(gallery["index"]), [address, address], timeout_s=1)
    finally:
        listener.close()
        for conn, _ in held:
            conn.close()
    assert time.monotonic() - started < 30


def test_beyond_the_loopback_a_shard_server_refuses_to_start_without_a_token(gallery, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    done = run_module("index", "serve-shard", gallery["index"], "--shard", "0", "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2, done.stderr
    error = done.stderr.strip()
    assert error.startswith("error: serve-shard would listen on 0.0.0.0") and "\n" not in error, error
    assert TOKEN_ENV in error and "--token" in error and one_sentence(error)


@pytest.mark.slow  # starts two shard-server processes
def test_with_a_token_only_the_right_token_is_answered(gallery, shard_servers, monkeypatch):
    """Both servers listen on every interface (0.0.0.0), one given its token by the environment, one by --token;
    the client reaches them at 127.0.0.1. No token or a wrong one: one sentence (401 on the wire, a ConfigError
    naming the fix in the client); the right one: the local index's results."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    servers = [shard_servers(0, "--host", "0.0.0.0", env={TOKEN_ENV: "s3cret-token"}),
               shard_servers(1, "--host", "0.0.0.0", "--token", "s3cret-token")]
    assert all("token required" in "".join(server.lines) for server in servers)
    addresses = [server.address for server in servers]
    for token, phrase in [(None, "refused a missing token"), ("s3cret-tokem", "refused the token")]:
        with pytest.raises(ConfigError, match=phrase) as refused:
            open_gallery(gallery["index"], shard_servers=addresses, shard_token=token)
        assert f"--shard-token or {TOKEN_ENV}" in str(refused.value) and one_sentence(str(refused.value))
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}]:
        connection = http.client.HTTPConnection(*addresses[1], timeout=60)
        connection.request("GET", "/describe", headers=headers)
        response = connection.getresponse()
        check_refusal(response.status, response.read(), 401, "wants its shared token", gallery["index"])
        connection.close()
    remote = open_gallery(gallery["index"], shard_servers=addresses, shard_token="s3cret-token")
    assert_same_results(remote, open_gallery(gallery["index"]), gallery["queries"])


@pytest.mark.slow  # starts a shard-server process
def test_each_bad_request_gets_one_sentence_and_the_next_search_is_answered(gallery, shard_servers):
    server = shard_servers(0)
    query = gallery["queries"][:3].astype("<f4").tobytes()
    nan = np.full((1, DIM), np.nan, "<f4").tobytes()
    too_many = np.zeros((MAX_QUERIES + 1, DIM), "<f4").tobytes()
    cases = [  # method, path, body, status, phrase
        ("GET", "/nope", None, 404, "there is no GET"),
        ("POST", "/describe", b"", 405, "is not an endpoint"),
        ("POST", f"/search?k=0&dim={DIM}", query, 400, "k='0' is not a whole number from 1 to 1024"),
        ("POST", f"/search?k=5000&dim={DIM}", query, 400, "from 1 to 1024"),
        ("POST", f"/search?k=five&dim={DIM}", query, 400, "from 1 to 1024"),
        ("POST", "/search?k=5&dim=16", query, 400, "not the width of this shard's vectors (32)"),
        ("POST", f"/search?k=5&dim={DIM}", query[:100], 400, "not a whole number of 32-float32 queries"),
        ("POST", f"/search?k=5&dim={DIM}", b"", 400, "not a whole number of 32-float32 queries"),
        ("POST", f"/search?k=5&dim={DIM}", too_many, 413, f"more than the {MAX_QUERIES}"),
        ("POST", f"/search?k=5&dim={DIM}", nan, 400, "NaN or infinite"),
        ("POST", f"/search?k=5&dim={DIM}", iter([query]), 411, "no Content-Length"),  # chunked
    ]
    for method, path, body, status, phrase in cases:
        connection = http.client.HTTPConnection(*server.address, timeout=60)
        connection.request(method, path, body=body)
        response = connection.getresponse()
        check_refusal(response.status, response.read(), status, phrase, gallery["index"])
        assert response.getheader("Connection") == "close"
        connection.close()
    answer = raw_exchange(server.address, b"\x00\x01 not http at all\r\n\r\n")
    check_refusal(int(answer.split()[1]), answer.partition(b"\r\n\r\n")[2], 400, "not one this shard server reads",
                  gallery["index"])
    # the server goes on: a search on one kept-alive connection, twice
    connection = http.client.HTTPConnection(*server.address, timeout=60)
    for _ in range(2):
        connection.request("POST", f"/search?k=4&dim={DIM}", body=query)
        response = connection.getresponse()
        data = response.read()
        assert response.status == 200 and len(data) == 3 * 4 * (4 + 8)
    local = open_gallery(gallery["index"])
    first_shard_ids = np.frombuffer(data, "<i8", offset=3 * 4 * 4).reshape(3, 4)
    assert first_shard_ids.max() < 1000 and (first_shard_ids >= 0).all() and local.index.ntotal == 2000


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_a_port_outside_0_to_65535_is_one_sentence(gallery, port, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve-shard", str(gallery["index"]), "--shard", "0", "--port", port])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument --port: '{port}' is not a port number; give 0 to 65535" in error, error
