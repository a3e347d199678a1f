"""Stopping on request: on SIGTERM, SIGUSR1 or Ctrl-C (SIGINT), finish the step, save a checkpoint, and exit.

Schedulers warn before they take a machine away: Kubernetes and `scancel` send
SIGTERM (torchrun passes it on to every worker, then waits 30 s before
SIGKILL), SLURM sends SIGUSR1 ahead of the time limit when asked to
(`--signal=USR1@120`), and torchrun turns a Ctrl-C into SIGTERM for its workers.
The signal may reach some ranks only, or reach them at different steps, so the
ranks agree (`flag`, a `dist.AnyRankFlag`) and all stop after the same step.
The exit code 75 (EX_TEMPFAIL, "try again later") tells a requeue script that
the run is not finished and a checkpoint holds its state: running the same
command again in the same run directory continues from it. A Ctrl-C of a plain
`python train.py` does the same and exits 130 (128 + SIGINT), as programs do
when interrupted; a second Ctrl-C quits at once.

Standard library only: train.py installs the handlers before it imports torch,
so a SIGTERM that arrives while a rank is still starting (torchrun stopping
the job because another rank already failed) does not kill it before it has
said what is wrong.
"""

from __future__ import annotations

import signal

EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Every rank stopped after the same step because one of them was asked to; a checkpoint holds the state."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.interrupted = signal_name == "SIGINT"
        self.exit_code = INTERRUPTED_EXIT_CODE if self.interrupted else EXIT_CODE


class StopOnSignal:
    """Catches the stop signals once installed; `agreed()` says, the same on every rank, when to stop."""

    def __init__(self, flag=None):
        self.caught: str | None = None  # the name of the first signal that arrived
        self.flag = flag  # a dist.AnyRankFlag under DDP (set once the process group exists); None: this process
        self._previous: dict = {}

    def install(self) -> StopOnSignal:
        self._previous = {sig: signal.signal(sig, self._catch) for sig in SIGNALS}
        return self

    def _catch(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.caught == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
        self.caught = self.caught or signal.Signals(signum).name

    def agreed(self) -> bool:
        """Call after every training step on every rank. True on all ranks at the same step, one step
        after any of them caught a signal."""
        return self.agreed_with()[0]

    def agreed_with(self, *also: bool) -> tuple[bool, ...]:
        """`agreed()`, and in the same exchange whether any rank raised each flag of `also` (rank 0: a checkpoint
        is due by its clock): (stop, *also), the same on all ranks at the same step, one step after it was raised."""
        mine = (self.caught is not None, *also)
        return self.flag.exchange(*mine) if self.flag is not None else mine

    def finish(self) -> None:
        """Every rank got here: wait for the last exchange, which then returns at once."""
        if self.flag is not None:
            self.flag.finish()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
