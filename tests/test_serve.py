"""python -m recog.serve, started for real on 127.0.0.1 (a subprocess, as a user starts it), asked over HTTP: its
answers against recog.identify's, bad input, the in-flight bound, SIGTERM during requests, and its page in a
real browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from identify_setup import embed_gallery, fashion_test_images, random_checkpoint
from PIL import Image

from recog.data.write import FASHION_MNIST_CLASSES
from recog.export import export
from recog.identify import identify
from recog.index import build
from recog.testing import ServeProcess

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARTIFACTS = Path(os.environ.get("RECOG_TEST_ARTIFACTS", ROOT / "outputs" / "test-artifacts"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_data):
    """An export of a random-weight model, the 1,000 tiny training images embedded and indexed, 12 held-out
    test images as PNG files."""
    root = tmp_path_factory.mktemp("serve")
    random_checkpoint(root / "model.pt")
    export(root / "model.pt", root / "export", onnx=False)
    embed_gallery(root / "export", tiny_data["train"], root / "embeddings", "part_size=400")
    build(root / "embeddings", root / "index", log=lambda line: None)
    return {"root": root, "export": root / "export", "index": root / "index", "shards": tiny_data["train"],
            "images": fashion_test_images(root / "test", 12)}


class Server(ServeProcess):
    """recog.serve on the `served` fixture's export and index (and shards), one torch thread; an HTTP client."""

    def __init__(self, served: dict, *args: str, shards: bool = True):
        more = ["--shards", served["shards"]] if shards else []
        super().__init__("--model", served["export"], "--index", served["index"], "--threads", "1", *more, *args)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self):
        if hasattr(self, "client"):
            self.client.close()
        super().stop()


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=90)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height grey pixels (a decompression bomb's header: tiny file, huge
    image), with valid chunk checksums and no pixel data worth the name."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def post_image(client, path_or_bytes, k: int | None = None, multipart: bool = False):
    data = Path(path_or_bytes).read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    params = {} if k is None else {"k": k}
    if multipart:
        return client.post("/identify", params=params, files={"image": ("photo.png", data, "image/png")})
    return client.post("/identify", params=params, content=data)


@pytest.mark.slow  # starts a server process
def test_answers_equal_recog_identify_and_concurrent_requests_share_batches(served):
    paths = [path for path, _ in served["images"]]
    expected = identify(str(served["export"]), str(served["index"]), [str(p) for p in paths], k=7)
    want_sha = json.loads((served["export"] / "model.json").read_text())["checkpoint"]["sha256"]
    with Server(served, "--max-wait-ms", "300") as server:
        clients = [httpx.Client(base_url=server.url, timeout=60) for _ in paths]
        with ThreadPoolExecutor(len(paths)) as pool:  # all at once: the service batches them
            answers = list(pool.map(lambda i: post_image(clients[i], paths[i], 7, multipart=i % 2 == 1),
                                    range(len(paths))))
        for client in clients:
            client.close()
        for response, want in zip(answers, expected):
            assert response.status_code == 200, response.text
            got = response.json()
            assert got["vote"] == want["vote"]
            assert [(m["key"], m["label"], m["class"]) for m in got["matches"]] == \
                   [(m["key"], m["label"], m["class"]) for m in want["matches"]]
            np.testing.assert_allclose([m["score"] for m in got["matches"]], [m["score"] for m in want["matches"]],
                                       atol=1e-5)
            assert set(got["timing_ms"]) == {"decode", "model", "search"}
            assert (got["model_sha256"], got["index_generation"]) == (want_sha, 0)  # which pair answered
        batches = [r.json()["batch"] for r in answers]
        print(f"batch sizes seen by 12 concurrent requests: {batches}")
        assert max(batches) > 1
        health = server.client.get("/healthz").json()
        assert health["status"] == "ok" and health["index"]["count"] == 1000 and health["gallery_images"]
        assert (health["model_sha256"], health["index_generation"]) == (want_sha, 0)
        assert f"sha256 {health['model_sha256']}, 128-d embeddings of 28×28 px, 1 channel(s)" in server.log
        assert ": flat (Flat), 1,000 vectors in 1 shard(s); gallery images from " in server.log


@pytest.mark.slow  # starts a server process
def test_every_bad_input_gets_its_4xx_sentence_and_the_next_request_is_served(served):
    good = served["images"][0][0]
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    cases = [
        ("empty body", dict(content=b""), 400, "holds no image"),
        ("not an image", dict(content=b"hello, this is text\n" * 20), 415, "not an image"),
        ("truncated JPEG", dict(content=jpeg(photo)[:3000]), 400, "could not be decoded"),
        ("over the size limit", dict(content=rng.bytes(1_300_000)), 413, "larger than"),
        ("decompression bomb (over twice Pillow's limit)", dict(content=png_header_only(20000, 20000)), 413,
         "decompression-bomb"),
        ("decompression bomb (between Pillow's limit and twice it)", dict(content=png_header_only(10000, 10000)), 413,
         "decompression-bomb"),
        ("multipart without a file", dict(content=b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
                                                  b"--b--\r\n",
                                          headers={"content-type": "multipart/form-data; boundary=b"}), 400, "no file"),
        ("k=0", dict(content=good.read_bytes(), params={"k": 0}), 400, "from 1 to 100"),
        ("k too large", dict(content=good.read_bytes(), params={"k": 101}), 400, "from 1 to 100"),
        ("k not a number", dict(content=good.read_bytes(), params={"k": "five"}), 400, "from 1 to 100"),
        ("a 1×2000 image", dict(content=png(np.zeros((2000, 1), np.uint8))), 400, "too thin"),
    ]
    with Server(served, "--max-mb", "1") as server:
        reference = post_image(server.client, good).json()
        for name, request, status, phrase in cases:
            response = server.client.post("/identify", **request)
            assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
            error = response.json()["error"]
            assert phrase in error and error.count(". ") == 0 and error.endswith("."), f"{name}: {error}"
            after = post_image(server.client, good)
            assert after.status_code == 200 and after.json()["matches"] == reference["matches"], name
        # an RGB photo for this grey model is converted, not refused
        assert post_image(server.client, png(photo)).status_code == 200
        # gallery images: looked up by key, never a path
        key = reference["matches"][0]["key"]
        image = server.client.get(f"/items/{key}/image")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (28, 28)
        for bad_key in ["nope", "..", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "000000001.png", "%2E%2E"]:
            response = server.client.get(f"/items/{bad_key}/image")
            assert response.status_code == 404, bad_key
            assert response.json()["error"].endswith("."), bad_key  # a key not found, or no such path
        unknown = server.client.delete("/identify")
        assert unknown.status_code == 405 and "the endpoints are" in unknown.json()["error"]
        assert server.process.poll() is None


@pytest.mark.slow  # starts a server process
def test_a_gallery_image_is_revalidated_by_its_etag_and_never_sniffed(served):
    """A rebuilt gallery may give a key another image: no max-age, but no-cache and an ETag (the bytes' hash) that
    a browser sends back (If-None-Match) for a 304; nosniff, so the bytes are only ever the image type sent."""
    with Server(served) as server:
        key = post_image(server.client, served["images"][0][0]).json()["matches"][0]["key"]
        image = server.client.get(f"/items/{key}/image")
        assert image.status_code == 200 and image.headers["x-content-type-options"] == "nosniff"
        assert image.headers["cache-control"] == "no-cache" and "max-age" not in image.headers["cache-control"]
        tag = image.headers["etag"]
        assert tag.startswith('"') and tag.endswith('"') and len(tag) > 10
        for sent in [tag, f"W/{tag}", f'"other", {tag}', "*"]:
            again = server.client.get(f"/items/{key}/image", headers={"If-None-Match": sent})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag, sent
            assert again.headers["x-content-type-options"] == "nosniff", sent
        changed = server.client.get(f"/items/{key}/image", headers={"If-None-Match": '"an older image"'})
        assert changed.status_code == 200 and changed.content == image.content


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "eighty"])
def test_a_port_outside_0_to_65535_is_one_sentence(port, capsys):
    from recog.serve import main

    with pytest.raises(SystemExit) as exited:
        main(["--model", "m", "--index", "i", "--port", port])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument --port: '{port}' is not a port number; give 0 to 65535" in error, error
    with pytest.raises(SystemExit):
        main(["--model", "m", "--index", "i", "--shard-servers", f"h:{port}"])
    assert "is not HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("device,message", [
    ("cuda", "--device cuda: this machine has 0 usable GPU(s); give --device cpu (the default) or a GPU it has."),
    ("gpu0", "--device gpu0 is not a device; give cpu, cuda or cuda:N."),
    ("meta", "--device meta: recog.serve computes on cpu or cuda; give one of those."),
])
def test_a_device_this_machine_lacks_is_one_sentence_before_anything_loads(device, message, capsys, tmp_path):
    import torch

    from recog.serve import main

    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has a GPU")
    # the folders do not exist: the device is refused before they are read
    code = main(["--model", str(tmp_path / "m"), "--index", str(tmp_path / "i"), "--device", device])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"


def test_a_negative_batch_threads_is_one_sentence_before_anything_loads(capsys, tmp_path):
    from recog.serve import main

    code = main(["--model", str(tmp_path / "m"), "--index", str(tmp_path / "i"), "--batch-threads", "-1"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --batch-threads -1 must be 0 (the cores / the torch threads) or more.")


def test_on_a_gpu_the_embeddings_equal_the_cpus(served):
    """bench/gpu_session.sh part 9 runs this where there is a GPU; here it is skipped."""
    import torch

    from recog.exported import ExportedEmbedder

    if not torch.cuda.is_available():
        pytest.skip("no GPU here")
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    cpu, gpu = ExportedEmbedder(served["export"]), ExportedEmbedder(served["export"], "cuda")
    assert np.abs(cpu.embed(images) - gpu.embed(images)).max() < 1e-3


def test_shards_takes_several_folders_at_once_or_one_at_a_time():
    from recog.serve import parser

    args = parser().parse_args(["--model", "m", "--index", "i", "--shards", "day1", "day2", "--shards", "day3"])
    assert args.shards == ["day1", "day2", "day3"]


def test_a_grey_upload_is_converted_for_an_rgb_model_and_an_rgb_one_for_a_grey_model():
    from recog.serve import decode_upload

    def preprocess(x):
        return x

    grey, rgb = np.full((20, 30), 77, np.uint8), np.zeros((20, 30, 3), np.uint8)
    assert decode_upload(png(grey), 3, preprocess, 10**6).shape == (3, 20, 30)
    assert decode_upload(png(rgb), 1, preprocess, 10**6).shape == (1, 20, 30)
    assert decode_upload(jpeg(rgb), 1, preprocess, 10**6).shape == (1, 20, 30)


@pytest.mark.slow  # starts a server process
def test_past_max_inflight_the_answer_is_503_at_once(served):
    path = served["images"][0][0]
    with Server(served, "--max-inflight", "2", "--max-wait-ms", "1500") as server:
        clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(6)]

        def timed_post(client):
            started = time.perf_counter()
            response = post_image(client, path)
            return response.status_code, time.perf_counter() - started, response
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(timed_post, clients))
        for client in clients:
            client.close()
        codes = sorted(code for code, _, _ in results)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
        slowest_refusal = max(s for code, s, _ in results if code == 503)
        quickest_answer = min(s for code, s, _ in results if code == 200)
        assert slowest_refusal < quickest_answer  # refused at once, while the batch was still waiting
        refusal = next(r for code, _, r in results if code == 503)
        assert refusal.headers["retry-after"] == "1" and "--max-inflight" in refusal.json()["error"]
        assert post_image(server.client, path).status_code == 200  # served again once the others are done


@pytest.mark.slow  # starts a server process
def test_sigterm_finishes_the_requests_in_flight_then_exits(served):
    paths = [path for path, _ in served["images"][:4]]
    with Server(served, "--max-wait-ms", "3000") as server:
        clients = [httpx.Client(base_url=server.url, timeout=60) for _ in paths]
        with ThreadPoolExecutor(len(paths)) as pool:
            futures = [pool.submit(post_image, client, p) for client, p in zip(clients, paths)]
            deadline = time.monotonic() + 30
            while server.client.get("/healthz").json()["inflight"] < len(paths):
                assert time.monotonic() < deadline, "the requests never arrived"
                time.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            responses = [f.result(timeout=60) for f in futures]
        for client in clients:
            client.close()
        assert [r.status_code for r in responses] == [200] * len(paths), [r.text for r in responses]
        assert server.process.wait(60) == 0, server.log
        assert "stopped after 4 requests answered" in server.log


def browser_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow  # starts a server process and a browser
def test_the_page_shows_a_test_images_matches_in_a_real_browser(served):
    playwright = pytest.importorskip("playwright.sync_api")
    executable = browser_path()
    if executable is None:
        if os.environ.get("RECOG_REQUIRE_BROWSER"):
            pytest.fail("no chromium on this machine, and RECOG_REQUIRE_BROWSER is set: apt-get install chromium")
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    path, label = served["images"][3]
    with Server(served) as server:
        api = post_image(server.client, path).json()
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 700})
                page.goto(server.url + "/")
                page.wait_for_function("document.getElementById('about').textContent.includes('1,000 items')")
                page.set_input_files("#file", str(path))
                page.wait_for_selector("#matches li.match >> nth=4")
                page.wait_for_function("[...document.querySelectorAll('#matches img')]"
                                       ".every((img) => img.complete && img.naturalWidth === 28)")
                labels = page.locator("#matches .label").all_inner_texts()
                vote, timing, about = page.inner_text("#vote"), page.inner_text("#timing"), page.inner_text("#about")
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
            finally:
                browser.close()
    assert labels == [m["class"] for m in api["matches"]] and len(labels) == 5
    assert all(name in FASHION_MNIST_CLASSES for name in labels)
    assert vote == api["vote"]
    assert f"answered by model {api['model_sha256'][:12]}, index generation 0" in timing
    assert f"generation 0, model {api['model_sha256'][:12]}" in about
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 10_000
    print(f"page screenshot: {ARTIFACTS / 'serve_page.png'}; true class {FASHION_MNIST_CLASSES[label]}, "
          f"vote {vote}")


def test_the_listening_socket_gives_connections_without_nagles_delay():
    """bind() makes the socket uvicorn serves on; asyncio turns Nagle's algorithm off only for connections whose
    socket says TCP (a socket made with proto 0 gave every keep-alive answer ~40 ms of delayed-ACK wait)."""
    import asyncio
    import socket

    from recog.serve import bind

    async def accepted_nodelay() -> int:
        found = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                found.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = bind("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        value = await asyncio.wait_for(found, 30)
        writer.close()
        server.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


@pytest.mark.slow  # starts a server and two shard servers
def test_an_index_sharded_over_shard_servers_answers_as_the_local_index(served, tmp_path):
    """The gallery indexed in 2 shards, each held by its own `recog.index serve-shard` process (as on two
    machines, here wanting a token); recog.serve searches both with the token and merges: the same answers as
    recog.identify on the one-shard index."""
    build(served["root"] / "embeddings", tmp_path / "index2", shards=2, log=lambda line: None)
    paths = [path for path, _ in served["images"]]
    expected = identify(str(served["export"]), str(served["index"]), [str(p) for p in paths], k=7)
    shard_servers = [ServeProcess("serve-shard", tmp_path / "index2", "--shard", str(n), "--token", "tok-3n2",
                                  module="recog.index") for n in (0, 1)]
    try:
        assert "500 vectors" in shard_servers[0].log and "500 vectors" in shard_servers[1].log
        sharded = {**served, "index": tmp_path / "index2"}
        addresses = ",".join(server.url for server in shard_servers)
        with Server(sharded, "--shard-servers", addresses, "--shard-token", "tok-3n2") as server:
            for path, want in zip(paths, expected):
                got = post_image(server.client, path, 7).json()["matches"]
                np.testing.assert_allclose([m["score"] for m in got], [m["score"] for m in want["matches"]],
                                           atol=1e-5)
                # a random-weight model gives many equal scores: equal items may come in another order, and at
                # the k-th score either of them may be cut; above it, the same items
                above = want["matches"][-1]["score"] + 1e-5
                assert {m["key"] for m in got if m["score"] > above} == \
                       {m["key"] for m in want["matches"] if m["score"] > above}
            assert f"searched by {addresses.replace(',', ', ')}" in server.log
            # SIGHUP: no reload across shard servers (each holds one generation), one log line, and it answers on
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while server.client.get("/healthz").json()["reloads"]["refused"] < 1:
                assert time.monotonic() < deadline, server.log
                time.sleep(0.05)
            while "SIGHUP: no reload with --shard-servers" not in server.log:  # read by a thread here: may lag
                assert time.monotonic() < deadline, server.log
                time.sleep(0.05)
            assert server.log.count("SIGHUP: no reload with --shard-servers") == 1
            again = post_image(server.client, paths[-1], 7)
            assert again.status_code == 200 and again.json()["matches"] == got  # the last image's, above
        # the servers in the wrong order: one sentence, before serving anything
        swapped = ",".join(server.url for server in reversed(shard_servers))
        with pytest.raises(RuntimeError, match="serves shard 1 .* not shard 0 .* give the servers in shard order"):
            Server(sharded, "--shard-servers", swapped, "--shard-token", "tok-3n2")
        # no token: one sentence naming the fix, before serving anything
        with pytest.raises(RuntimeError, match="refused a missing token; give --shard-token or RECOG_SHARD_TOKEN"):
            Server(sharded, "--shard-servers", addresses)
    finally:
        for shard_server in shard_servers:
            shard_server.stop()


def test_batches_run_on_as_many_threads_as_asked_and_each_takes_every_query_that_waited():
    """Two batch threads: two batches are computed at once (each waits at a barrier for the other: with one thread
    the barrier breaks); a third batch, once a thread is free, takes all the queries that arrived meanwhile."""
    import asyncio
    import threading

    import torch

    from recog.serve import Batcher

    both_running, release, sizes = threading.Barrier(2, timeout=30), threading.Event(), []

    def compute(batch):
        sizes.append(len(batch))
        if len(sizes) <= 2:
            both_running.wait()  # BrokenBarrierError unless the other batch runs at the same time
            release.wait(30)
        return [query.pixels * 10 for query in batch]

    async def until(count):
        while len(sizes) < count:
            await asyncio.sleep(0.01)

    async def scenario():
        batcher = Batcher(compute, max_batch=32, max_wait_s=0.0, workers=2)
        batcher.start()
        first = [asyncio.create_task(batcher.submit(torch.tensor(0), 1))]
        await until(1)  # the first batch, one query, computing
        first.append(asyncio.create_task(batcher.submit(torch.tensor(1), 1)))
        await until(2)  # and the second, on the other thread
        later = [asyncio.create_task(batcher.submit(torch.tensor(i), 1)) for i in range(2, 7)]
        await asyncio.sleep(0.2)  # the five are queued behind the two busy threads
        release.set()
        answers = await asyncio.gather(*first, *later)
        await batcher.stop()
        return [int(a) for a in answers]

    assert asyncio.run(scenario()) == [i * 10 for i in range(7)]
    assert sizes == [1, 1, 5]


def test_only_small_images_are_decoded_on_the_event_loop():
    from recog.serve import INLINE_DECODE_PIXELS, small_image

    rng = np.random.default_rng(0)
    assert INLINE_DECODE_PIXELS == 64 * 64
    assert small_image(png(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    assert small_image(jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    assert not small_image(png(rng.integers(0, 256, (65, 64), dtype=np.uint8)))  # one row more: a decode thread
    assert not small_image(png_header_only(20_000, 20_000))  # a bomb's header: refused on a thread, as before
    assert not small_image(b"not an image") and not small_image(b"")
