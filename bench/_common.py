"""What the benchmarks share: their optional packages checked up front, side-by-side rounds, and tables.

    from _common import require, rounds, medians, timed, sync, header, row, markdown_table

A benchmark runs as a script (`python bench/X.py`, or under torchrun), so bench/ is on sys.path and this
module imports as `_common`.
"""

from __future__ import annotations

import importlib.util
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
PACKAGES = {"sklearn": "scikit-learn"}  # module name: the name pip installs it under, where they differ


def require(*modules: str, extra: str = "bench") -> None:
    """Exit with one sentence if an optional module is missing: call it before any work, so that a long run
    does not fail on its last line."""
    missing = [PACKAGES.get(m, m) for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        names = " and ".join(missing)
        raise SystemExit(f"error: bench/{Path(sys.argv[0]).name} needs {names}, which "
                         f"{'is' if len(missing) == 1 else 'are'} not installed here: "
                         f".venv/bin/pip install -e '.[{extra}]'")


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """fn(*args) and its wall seconds."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def sync(device) -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so that a clock read after it includes that work."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def rounds(cases: dict[str, Callable[[int], float]], count: int, *, rotate: bool = True,
           progress: bool = False) -> dict[str, list[float]]:
    """Run every case once per round; each case's figures (what it returns, given the round index) in round order.

    rotate: the order rotates each round (with two cases, they alternate which goes first), so that on a
    shared, noisy machine drift hits every case alike and none always runs on a warmer machine.
    progress: print "round r/count done" after each round.
    """
    names = list(cases)
    figures: dict[str, list[float]] = {name: [] for name in names}
    for r in range(count):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            figures[name].append(cases[name](r))
        if progress:
            print(f"round {r + 1}/{count} done", flush=True)
    return figures


def medians(figures: dict[str, list[float]]) -> dict[str, float]:
    """The median of each case's rounds."""
    return {name: statistics.median(v) for name, v in figures.items()}


# A text table's column: (title, format spec of its values, e.g. ">9.1f"). The title, and a value that is a
# str (a "-" for a missing figure), take only the spec's alignment and width. Spaces before the spec widen
# the gap before the column.
Column = tuple[str, str]


def _layout(spec: str) -> tuple[str, str, str]:
    """(gap before the column, alignment + width, the whole spec without the gap)."""
    body = spec.lstrip(" ")
    return " " * (len(spec) - len(body)), re.match(r"[<>^]?\d*", body).group(), body


def header(columns: Sequence[Column]) -> str:
    """A text table's title line."""
    cells = []
    for title, spec in columns:
        gap, width, _ = _layout(spec)
        cells.append(gap + format(title, width))
    return " ".join(cells)


def row(columns: Sequence[Column], values: Sequence[Any]) -> str:
    """One line of a text table, under header(columns)."""
    cells = []
    for (_, spec), value in zip(columns, values, strict=True):
        gap, width, body = _layout(spec)
        cells.append(gap + format(value, width if isinstance(value, str) else body))
    return " ".join(cells)


def markdown_table(titles: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> list[str]:
    """A Markdown table's lines; align has one letter per column: "l" left, "r" right (figures)."""
    rule = "|" + "|".join({"l": "---", "r": "---:"}[a] for a in align) + "|"
    return ["| " + " | ".join(titles) + " |", rule, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]
