"""recog.serve reloads its export and index on SIGHUP without a restart or a failed request: a real server process
on 127.0.0.1, 32 client threads sending real images the whole time, and the index path a symlink flipped (os.replace)
between two folders of one gallery, generation 0 (`build` of day 1) and generation 1 (`build` of day 1, then
`recog.index add` of day 2): the blue/green pattern of a deployment that builds the next index beside the one
served. Then `recog.index add` into the folder being served, as the daily loop does it."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED
from identify_setup import embed_gallery, fashion_test_images, random_checkpoint, run_module

from recog.data.idx import find_idx_pair
from recog.data.manifest import load_manifest
from recog.data.write import FASHION_MNIST_CLASSES, idx_records, write_shards
from recog.export import export
from recog.gallery import open_gallery
from recog.index import add, build
from recog.index_files import read_index_info
from recog.testing import ROOT, ServeProcess

pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIENTS = 32


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Two days of Fashion-MNIST training images as two shard folders (600 and 300 images), a random-weight model
    exported, each day embedded, and the index folders: g0 (day 1, generation 0), g1 (day 1 then day 2 added,
    generation 1) and other (day 2 embedded with another model's export)."""
    root = tmp_path_factory.mktemp("reload")
    records, classes = idx_records(*find_idx_pair(BUNDLED, "train"), FASHION_MNIST_CLASSES)
    for name, part in (("day1", records[:600]), ("day2", records[600:900])):
        write_shards(part, classes, root / name, prefix=name, shard_samples=256, progress=False)
    for name, seed in (("a", 0), ("b", 1)):
        random_checkpoint(root / f"{name}.pt", seed=seed)
        export(root / f"{name}.pt", root / f"export-{name}", onnx=False)
    for export_name, day in (("a", "day1"), ("a", "day2"), ("b", "day2")):
        embed_gallery(root / f"export-{export_name}", root / day, root / f"emb-{export_name}-{day}")
    quiet = dict(log=lambda line: None)
    build(root / "emb-a-day1", root / "g0", **quiet)
    build(root / "emb-a-day1", root / "g1", **quiet)
    add(root / "g1", root / "emb-a-day2")
    build(root / "emb-b-day2", root / "other", **quiet)
    day2 = load_manifest(root / "day2").identity
    new_keys = [str(key) for key in open_gallery(root / "g1").keys if str(key).startswith(f"{day2}:")]
    from recog.serve import GalleryImages  # the service's own reader of gallery images, as in a request
    images = GalleryImages([str(root / "day2")], open_gallery(root / "g1").info.sources)
    new_items = {key: images.read(key) for key in new_keys[:: len(new_keys) // 4][:4]}  # 4 items only in g1
    tests = [path.read_bytes() for path, _ in fashion_test_images(root / "test", 12)]
    return {"root": root, "export": root / "export-a", "new_items": new_items, "tests": tests}


def point(link: Path, target: Path) -> None:
    """Make `link` name `target` in one step (a reader sees the old folder or the new, never neither)."""
    fresh = link.with_name(link.name + ".next")
    fresh.unlink(missing_ok=True)
    fresh.symlink_to(target)
    os.replace(fresh, link)


def request(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """One request on a connection of its own (so that a closed keep-alive connection is not mistaken for a
    failure of the service): its status and its JSON."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if response.getheader("content-type") == "application/json" else {}
    finally:
        connection.close()


class Clients:
    """CLIENTS threads, each posting images (the held-out test images, and the items only generation 1 holds) one
    after another until stopped; every answer kept as (status, model_sha256, index_generation, image, top key)."""

    def __init__(self, url: str, images: list[tuple[str, bytes]]):
        self.url, self.images, self.answers, self.seconds = url, images, [], []
        self.stopping, self.errors = threading.Event(), []
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def run(self, number: int) -> None:
        for name, data in itertools.islice(itertools.cycle(self.images), number, None):
            if self.stopping.is_set():
                return
            started = time.monotonic()
            try:
                status, body = request(self.url, "POST", "/identify?k=3", data)
            except Exception as e:  # noqa: BLE001 - a refused or dropped connection is a failed request too
                self.errors.append(repr(e))
                continue
            self.seconds.append((started, time.monotonic()))
            top = body["matches"][0]["key"] if status == 200 else None
            self.answers.append((status, body.get("model_sha256"), body.get("index_generation"), name, top,
                                 [m["key"] for m in body.get("matches", [])], body.get("error")))

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(180)


def wait_for(server: ServeProcess, done: int, refused: int, timeout: float = 180) -> dict:
    """/healthz once `done` reloads and `refused` refusals are counted and none runs."""
    deadline = time.monotonic() + timeout
    while True:
        status, health = request(server.url, "GET", "/healthz")
        reloads = health["reloads"]
        if (reloads["done"], reloads["refused"], reloads["running"]) == (done, refused, False):
            return health
        assert status == 200 and time.monotonic() < deadline, (health, server.log)
        time.sleep(0.05)


def check_new_items(server: ServeProcess, generation: int, new_items: dict[str, bytes]) -> None:
    """An item only in generation 1 is its own first match there (its own image, score 1), and no match in
    generation 0; its gallery image is served in generation 1 only (its shard folder is opened at the reload)."""
    for key, data in new_items.items():
        status, body = request(server.url, "POST", "/identify?k=3", data)
        assert status == 200 and body["index_generation"] == generation, body
        keys = [m["key"] for m in body["matches"]]
        if generation == 1:
            assert keys[0] == key and body["matches"][0]["score"] > 0.999, body
        else:
            assert key not in keys, body
        image_status, _ = request(server.url, "GET", f"/items/{key}/image")
        assert image_status == (200 if generation == 1 else 404), (generation, key)


@pytest.mark.slow  # a server process, 32 clients, 9 reloads
def test_sighup_switches_generations_under_32_clients_with_no_failed_request(days, tmp_path):
    root, link, new_items = days["root"], tmp_path / "index", days["new_items"]
    point(link, root / "g0")
    args = ["--model", days["export"], "--index", link, "--shards", root / "day1", "--threads", "1"]
    with ServeProcess(*args) as server:
        health = wait_for(server, 0, 0)
        sha, loaded = health["model_sha256"], {(health["model_sha256"], health["index_generation"])}
        assert health["index_generation"] == 0 and health["index"]["count"] == 600
        images = [(f"test{i}", data) for i, data in enumerate(days["tests"])] + list(new_items.items())
        clients = Clients(server.url, images)
        try:
            while len(clients.answers) < CLIENTS:  # every client under way before the first SIGHUP
                time.sleep(0.05)
            reloads = []
            for done in range(1, 6):  # 5 SIGHUPs: generation 1, 0, 1, 0, 1
                generation = done % 2
                point(link, root / f"g{generation}")
                before = len(clients.answers)
                started = time.monotonic()
                server.process.send_signal(signal.SIGHUP)
                health = wait_for(server, done, 0)
                reloads.append((started, time.monotonic(), len(clients.answers) - before))
                assert (health["model_sha256"], health["index_generation"]) == (sha, generation), health
                assert health["index_id"] == read_index_info(root / f"g{generation}").identity  # which folder
                assert health["index"]["count"] == (900 if generation else 600)
                loaded.add((sha, generation))
                check_new_items(server, generation, new_items)
            # an index built from another model's embeddings: refused in one log line, generation 1 goes on
            refusals = refused_pairs(server, link, root / "other", done=5, refused=1, clients=clients)
            assert "was built from another model's embeddings" in refusals[0] and sha[:12] in refusals[0]
            # a folder that is no index at all: refused too
            (tmp_path / "empty").mkdir()
            refusals = refused_pairs(server, link, tmp_path / "empty", done=5, refused=2, clients=clients)
            assert "no index.json in" in refusals[1]
            # the daily loop: `recog.index add` into the folder being served, then SIGHUP
            daily_loop(server, link, root, tmp_path, loaded, new_items)
            times = log_lines(server, "reloaded in", 7)
        finally:
            clients.stop()
    check_answers(clients, loaded, new_items)
    print(f"{len(clients.answers)} answers from {CLIENTS} clients, all 200; by generation: "
          f"{dict(Counter(a[2] for a in clients.answers))}; the test's wait from each of the 5 SIGHUPs to the "
          f"switch on /healthz (s, answers meanwhile): {[(round(b - a, 2), n) for a, b, n in reloads]}")
    print(latencies(clients.seconds, [(a, b) for a, b, _ in reloads]))
    print("\n".join(times))


def latencies(spans: list[tuple[float, float]], reloads: list[tuple[float, float]]) -> str:
    """Answer times of the requests that overlapped a reload (SIGHUP to switch) and of the others."""
    during = [end - start for start, end in spans if any(start < b and end > a for a, b in reloads)]
    others = [end - start for start, end in spans if not any(start < b and end > a for a, b in reloads)]
    return "; ".join(f"{name}: {len(x)} answers, p50 {np.percentile(x, 50) * 1000:.0f} ms, p99 "
                     f"{np.percentile(x, 99) * 1000:.0f} ms" for name, x in (("during reloads", during),
                                                                            ("between them", others)))


def log_lines(server: ServeProcess, phrase: str, count: int, timeout: float = 60) -> list[str]:
    """The server's log lines holding `phrase`, once there are `count` (its log is read on a thread of this process,
    so a line the server wrote may arrive a moment after /healthz counts it); never more."""
    deadline = time.monotonic() + timeout
    while len(lines := [line for line in server.log.splitlines() if phrase in line]) < count:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.05)
    assert len(lines) == count, server.log
    return lines


def refused_pairs(server, link: Path, target: Path, done: int, refused: int, clients: Clients) -> list[str]:
    """Point the index at `target`, SIGHUP: the pair is refused (one log line each) and the old pair answers on."""
    before = len(clients.answers)
    health_before = request(server.url, "GET", "/healthz")[1]
    point(link, target)
    server.process.send_signal(signal.SIGHUP)
    health = wait_for(server, done, refused)
    assert (health["model_sha256"], health["index_generation"]) == \
           (health_before["model_sha256"], health_before["index_generation"])
    deadline = time.monotonic() + 60
    while len(clients.answers) < before + CLIENTS:  # the old pair goes on answering
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines = log_lines(server, "reload refused", refused)
    assert f"still serving model {health['model_sha256'][:12]} with index generation " \
           f"{health['index_generation']}: " in lines[-1]
    return lines


def daily_loop(server, link: Path, root: Path, tmp_path: Path, loaded: set, new_items: dict) -> None:
    """A copy of generation 0 served, then `python -m recog.index add` of day 2 into it, then SIGHUP: generation 1
    of that folder (the old generation's files are gone from the folder; the service had them in memory)."""
    live = tmp_path / "live"
    shutil.copytree(root / "g0", live, ignore=shutil.ignore_patterns(".*"))
    point(link, live)
    server.process.send_signal(signal.SIGHUP)
    health = wait_for(server, 6, 2)
    assert health["index_generation"] == 0
    result = run_module("index", "add", live, root / "emb-a-day2")
    assert result.returncode == 0, result.stdout + result.stderr
    server.process.send_signal(signal.SIGHUP)
    health = wait_for(server, 7, 2)
    assert health["index_generation"] == 1 and health["index"]["count"] == 900
    loaded.add((health["model_sha256"], 1))
    check_new_items(server, 1, new_items)


def check_answers(clients: Clients, loaded: set, new_items: dict) -> None:
    """Zero non-200 answers and no failed connection; every answer names a pair that was loaded; an answer that
    says generation 1 found the generation-1 items, one that says generation 0 did not (the label is the truth)."""
    assert not clients.errors, clients.errors[:5]
    statuses = Counter(answer[0] for answer in clients.answers)
    assert set(statuses) == {200}, (statuses, [a for a in clients.answers if a[0] != 200][:5])
    assert {(answer[1], answer[2]) for answer in clients.answers} <= loaded
    assert {answer[2] for answer in clients.answers} == {0, 1}
    for _, _, generation, name, top, keys, _ in clients.answers:
        if name in new_items:
            assert (top == name) if generation == 1 else (name not in keys), (generation, name, keys)


def test_sighups_during_a_reload_make_one_more_reload_not_one_each(caplog):
    """Real SIGHUPs to this process, taken by a running event loop: the first starts a reload (held here until
    released); three more while it runs make one reload after it; one after that, one more."""
    from recog.serve import Reloader

    running, release, runs = threading.Event(), threading.Event(), []

    def reload():
        runs.append(len(runs))
        running.set()
        release.wait(60)

    async def signals():
        reloader = Reloader(reload)
        reloader.start(asyncio.get_running_loop())
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            await until(running.is_set)
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGHUP)
                await asyncio.sleep(0.05)  # each one reaches the loop before the next is sent
            assert runs == [0]
            release.set()
            await until(lambda: len(runs) == 2 and not reloader.running)
            await asyncio.sleep(0.5)
            assert runs == [0, 1]  # not 4
            os.kill(os.getpid(), signal.SIGHUP)
            await until(lambda: len(runs) == 3)
        finally:
            reloader.stop()
            reloader.thread.join(10)

    with caplog.at_level("INFO", logger="recog.serve"):
        asyncio.run(signals())
    assert [r.message for r in caplog.records] == ["SIGHUP during a reload: one more reload follows this one"]


async def until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def test_sighups_while_the_service_starts_are_one_reload_once_it_listens(days):
    """A SIGHUP while `python -m recog.serve` loads torch, the export and the index (a daily job adding to the index
    just after a restart) does not end it: every one sent from its first moments until it listens is one reload
    once it does. Before the handler at the top of recog/serve.py, the first ended the process (SIGHUP's default)."""
    command = [sys.executable, "-m", "recog.serve", "--model", str(days["export"]), "--index", str(days["root"] / "g0"),
               "--host", "127.0.0.1", "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        time.sleep(0.2)  # the interpreter itself starts: from the module's first lines on, SIGHUP is noted
        sent, deadline = 0, time.monotonic() + 180
        while not any("listening on" in line for line in lines):
            assert process.poll() is None, f"recog.serve ended (status {process.returncode}) after {sent} " \
                                           "SIGHUP(s) while starting:\n" + "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            process.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.1)
        while not any("reloaded in" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        time.sleep(1.0)  # a second reload would have begun by now
        assert sent >= 3, "".join(lines)  # they came while it loaded, not after
        assert sum("reloaded in" in line for line in lines) == 1, "".join(lines)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait(30)
        reader.join(10)
