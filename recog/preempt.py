"""Preemption: on SIGTERM or SIGUSR1, finish the step, save a checkpoint, and exit with code 75.

Schedulers warn before they take a machine away: Kubernetes and `scancel` send
SIGTERM (torchrun passes it on to every worker, then waits 30 s before
SIGKILL), SLURM sends SIGUSR1 ahead of the time limit when asked to
(`--signal=USR1@120`). The signal may reach some ranks only, or reach them at
different steps, so the ranks agree (`dist.AnyRankFlag`) and all stop after the
same step. The exit code 75 (EX_TEMPFAIL, "try again later") tells a requeue
script that the run is not finished and a checkpoint holds its state: running
the same command again in the same run directory continues from it.
"""

from __future__ import annotations

import signal

from recog import dist

EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Every rank stopped after the same step because one of them was asked to; a checkpoint holds the state."""


class StopOnSignal:
    """Catches SIGTERM/SIGUSR1 in this process; `agreed()` says, the same on every rank, when to stop."""

    def __init__(self):
        self.caught: str | None = None  # the name of the signal, once one arrived
        self._flag = dist.AnyRankFlag()
        self._previous = {sig: signal.signal(sig, self._catch) for sig in SIGNALS}

    def _catch(self, signum, frame) -> None:
        self.caught = self.caught or signal.Signals(signum).name

    def agreed(self) -> bool:
        """Call after every training step on every rank. True on all ranks at the same step, one step
        after any of them caught a signal."""
        return self._flag.exchange(self.caught is not None)

    def close(self, clean: bool = True) -> None:
        """Put the previous handlers back; `clean`: every rank got here, so the last exchange can finish."""
        if clean:
            self._flag.finish()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

