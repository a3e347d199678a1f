"""Every benchmark starts: its imports of recog still hold (a refactor cannot leave one broken unnoticed),
and a missing optional package is one sentence before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.name != "loose.py")


def test_every_benchmark_imports():
    """One process imports every benchmark as a module (its main() does not run): a name that moved in recog
    fails here, not ten minutes into a benchmark."""
    code = (f"import importlib, sys; sys.path.insert(0, {str(BENCH)!r})\n"
            f"for name in {[s[:-3] for s in SCRIPTS]!r}: importlib.import_module(name)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_missing_optional_package_is_one_sentence(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); sys.argv = ['bench/scaling.py']\n"
            "from _common import require\nrequire('a_package_that_is_not_there')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: bench/scaling.py needs a_package_that_is_not_there, which is not "
                                     "installed here: .venv/bin/pip install -e '.[bench]'")
