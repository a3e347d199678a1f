"""Rank 0's progress line, every `log_every` steps (where StepLog has just summed the ranks' figures): the step of
the run's total, the epoch, loss, images/s, data wait and two ETAs, the epoch's and the run's. A tqdm bar on stderr
when stderr is a terminal; plain lines through the "recog" logger otherwise (log files, SLURM, pipes), which
train.log gets too. The other ranks get a stand-in that prints nothing.

The ETAs come from the time one training step takes, an exponential moving average over the log windows (the
newest window weighing SMOOTHING): it follows a change of speed within a few windows without jumping at each one.
Evaluations are left out of that time (the loop pauses its clocks for them), so the ETAs count training steps only:
each evaluation (eval.every_steps, and each epoch's end) adds its own time.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("recog")

SMOOTHING = 0.3  # the newest window's weight in the moving average of a step's time


def duration(seconds: float | None) -> str:
    """`h:mm:ss` (days first when there are any), or `?` before a step's time is known."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Where the run stands and how long it has left, printed each time `update` is called (rank 0)."""

    def __init__(self, epochs: int, bar: bool | None = None):
        self.epochs = epochs
        self.step_s: float | None = None  # a training step's smoothed time
        self.bar = None
        self.use_bar = sys.stderr.isatty() if bar is None else bar

    def update(self, position, steps: int, seconds: float, loss: float, images_per_s: float, data_wait: float
               ) -> None:
        """`steps` taken in `seconds` of training since the last update (or the epoch's start)."""
        if steps:
            newest = seconds / steps
            self.step_s = newest if self.step_s is None else (1 - SMOOTHING) * self.step_s + SMOOTHING * newest
        left_epoch = position.batches_per_epoch - position.steps_done
        left_run = left_epoch + (self.epochs - position.epoch - 1) * position.batches_per_epoch
        total = position.step + left_run  # after a resume with another global batch, `step` counts the old steps
        eta_epoch = duration(self.step_s * left_epoch if self.step_s is not None else None)
        eta_run = duration(self.step_s * left_run if self.step_s is not None else None)
        epoch = f"epoch {position.epoch + 1}/{self.epochs} ({position.steps_done}/{position.batches_per_epoch})"
        figures = (f"loss {loss:.4f} | {images_per_s:.0f} images/s | data wait {100 * data_wait:.1f}% | "
                   f"epoch ETA {eta_epoch} | run ETA {eta_run}")
        line = f"step {position.step}/{total} | {epoch} | {figures}"
        if self.use_bar:
            self.show_bar(position.step, total, f"{epoch} | {figures}")
            to_log_files(line)
            if not left_run:
                self.close()
        else:
            log.info("%s", line)

    def show_bar(self, step: int, total: int, text: str) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}")
        self.bar.total = total
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def to_log_files(line: str) -> None:
    """The line in train.log (the log's file handlers), not on the console, where the bar is."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, "%s", (line,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class NoProgress:
    """What ranks other than 0 get: nothing printed."""

    def update(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(is_main: bool, epochs: int) -> Progress | NoProgress:
    return Progress(epochs) if is_main else NoProgress()
