"""Run tests again and again with every core busy: failure paths (error sentences, timeouts, restarts)
must hold on a loaded machine, as in CI and on a shared node.

    .venv/bin/python tests/under_load.py --times 30 \
        "tests/test_failures.py::test_the_sentence_reaches_the_user_whichever_rank_finds_it_first"

Starts one busy process per core, runs pytest on the given test ids `--times` times in a row, and prints
how many runs passed; exits 1 if any failed. Not part of the test suite (it takes minutes).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import subprocess
import sys
import time


def spin() -> None:
    while True:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="+", help="pytest ids")
    parser.add_argument("--times", type=int, default=30)
    parser.add_argument("--busy", type=int, default=os.cpu_count(), help="busy processes (default: one per core)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the busy processes
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for hog in hogs:
        hog.start()
    passed, start = 0, time.time()
    try:
        for i in range(1, args.times + 1):
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args.tests],
                                    capture_output=True, text=True)
            passed += result.returncode == 0
            print(f"run {i}/{args.times}: {'passed' if result.returncode == 0 else 'FAILED'} "
                  f"({time.time() - start:.0f} s so far, load {os.getloadavg()[0]:.1f})", flush=True)
            if result.returncode != 0:
                print(result.stdout[-4000:], flush=True)
    finally:
        for hog in hogs:
            hog.kill()
    print(f"{passed} of {args.times} runs passed with {args.busy} busy processes on {os.cpu_count()} cores")
    return 0 if passed == args.times else 1


if __name__ == "__main__":
    sys.exit(main())
