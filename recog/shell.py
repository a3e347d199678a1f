"""One shell for every command: how an expected failure ends a process (one sentence, an exit code).

Every command (train.py, recog.embed, recog.evaluate, recog.export, recog.index, recog.identify, recog.serve,
python -m recog.data) runs its work through `run_command`, so they all end the same way:

- a stop signal (`Preempted`): one line from rank 0 (to the console, and to train.log once logging is set up),
  exit code 75, or 130 after Ctrl-C; the same command continues the work;
- a mistake in the config or the paths (`ConfigError`): one sentence, said once per machine (every rank found it,
  or was told of it by `recog.dist.fail_together`), exit code 2;
- another expected failure (`RecogError`: unreadable data, a full disk, a lost rank): one sentence from the rank
  that found it, exit code 2;
- anything else is a programming error: it keeps its traceback (exit code 1; only the code, when `recog.dist`
  has printed it already, before telling the other ranks).

Collective calls that fail because another rank went away become one of those sentences in
`recog.dist.collective_failures`. Nothing here imports torch: the serving commands use it too.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from recog.errors import ConfigError, RecogError, sentence
from recog.preempt import SIGNALS, Preempted

log = logging.getLogger("recog")

EXIT_ERROR = 2  # an expected failure, said in one sentence
EXIT_BUG = 1  # a programming error, with its traceback


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 without a launcher); usable before any setup."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def print_once_per_node(*args, **kwargs) -> None:
    """For errors: every rank raises the same sentence once it has been shared (see fail_together), but a
    check that fails before the process group exists may fail on one machine only, so each machine says it."""
    if int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0) == 0:
        print(*args, **kwargs, flush=True)


def run_command(work: Callable[[], int | None]) -> int:
    """Run `work` (a command's body) and return its exit code: its own (None: 0), or that of the expected
    failure it raised, said in one sentence. Programming errors propagate with their traceback."""
    try:
        return work() or 0
    except Preempted as e:  # a checkpoint (or the parts) written so far are kept: the same command continues
        if env_rank() == 0:
            log.warning("%s: %s; exit code %d", "interrupted" if e.interrupted else "preempted", e, e.exit_code)
        return e.exit_code
    except ConfigError as e:
        print_once_per_node(f"error: {sentence(e)}", file=sys.stderr)
        return EXIT_ERROR
    except RecogError as e:
        print(f"error: {sentence(e)}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except Exception as e:
        if getattr(e, "reported", False):  # printed already, before the other ranks were told (recog.dist)
            return EXIT_BUG
        raise


def leave(code: int) -> None:
    """Exit a rank with `code`, ignoring the stop signals from here on. When one rank fails, torchrun sends
    SIGTERM to the others; one that is already leaving with its own code would otherwise be killed by it during
    Python's shutdown (which puts back the default action of every signal that had a handler) and report -15."""
    if code:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
