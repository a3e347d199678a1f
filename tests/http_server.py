"""A real HTTP server on 127.0.0.1 for tests: serves a folder, counts GETs per path, can fail on purpose."""

from __future__ import annotations

import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, owner: "CountingServer", **kwargs):
        self.owner = owner
        super().__init__(*args, **kwargs)

    def do_GET(self):
        owner = self.owner
        with owner.lock:
            owner.counts[self.path] += 1
            status = owner.fail.get(self.path)
            if status and owner.fail_times.get(self.path, 0) > 0:
                owner.fail_times[self.path] -= 1
            else:
                status = None
            stop = owner.stop_after is not None and sum(owner.counts.values()) > owner.stop_after
        if stop:  # the server "goes down": this request and every later one is refused
            threading.Thread(target=owner.stop, daemon=True).start()
            self.close_connection = True
            return
        if owner.delay_s:
            time.sleep(owner.delay_s)
        if status:
            self.send_error(status)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


class CountingServer:
    def __init__(self, root):
        self.counts: Counter[str] = Counter()
        self.fail: dict[str, int] = {}  # path -> HTTP status to answer with ...
        self.fail_times: dict[str, int] = {}  # ... this many times
        self.stop_after: int | None = None  # go down after this many requests in all
        self.delay_s = 0.0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, owner=self, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, path: str, status: int, times: int = 10**9) -> None:
        self.fail[path], self.fail_times[path] = status, times

    def shard_requests(self) -> dict[str, int]:
        return {p: n for p, n in self.counts.items() if p.endswith(".tar")}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
