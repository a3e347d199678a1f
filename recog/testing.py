"""What the tests and the benchmarks both need: `python -m recog.serve` (or `recog.index serve-shard`) run as a
user runs it, in a subprocess; photo-like JPEGs."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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


def _octaves(rng: np.random.Generator, width: int, height: int, octaves: int) -> np.ndarray:
    """Noise with the same amplitude at every scale, from 2 cells across to 2**octaves (natural images'
    1/f spectrum, roughly)."""
    field = np.zeros((height, width), np.float32)
    for octave in range(1, octaves + 1):
        cells = 2**octave
        low = rng.normal(0, 1, (max(2, cells * height // width), cells)).astype(np.float32)
        field += np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC))
    return field


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90,
                    grey: bool = False) -> bytes:
    """A JPEG with a photo's make-up: texture at every scale in the light, slow changes of colour, grain,
    a few sharp-edged objects. 500x375 at quality 90: ~85 KB (a photo of that size: ~70-150 KB)."""
    light = 20 * _octaves(rng, width, height, 9) + rng.normal(0, 6, (height, width))
    if grey:
        pixels = 120 + light
    else:
        colour = np.stack([25 * _octaves(rng, width, height, 4) for _ in range(3)], -1)
        pixels = 120 + light[..., None] + colour + rng.uniform(-60, 60, 3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y, r = rng.integers(0, width), rng.integers(0, height), int(rng.integers(10, max(11, width // 4)))
        fill = int(rng.integers(0, 256)) if grey else tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
