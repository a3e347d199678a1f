"""What the tests and the benchmarks both need: `python -m recog.serve` (or `recog.index serve-shard`) run as a
user runs it, in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServeProcess:
    """python -m recog.serve (or another `module` that takes --host and --port) on a free port of 127.0.0.1 (--port
    0; the log names the address), its output collected as it comes. `url` is where it listens (for recog.serve
    http://HOST:PORT, for a shard server HOST:PORT); `stop()` kills it if it still runs."""

    def __init__(self, *args: str, module: str = "recog.serve", start_timeout_s: float = 180):
        command = [sys.executable, "-m", module, *map(str, args), "--host", "127.0.0.1", "--port", "0"]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, cwd=ROOT)
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True, name="recog-serve-log").start()
        found = re.search(r"listening on (\S+)", self.log) if self._listening.wait(start_timeout_s) else None
        if found is None or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"{module} did not start:\n" + self.log)
        self.url = found.group(1)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "listening on" in line:
                self._listening.set()
        self._listening.set()  # it exited: nobody waits in vain

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
