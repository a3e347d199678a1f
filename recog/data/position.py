"""Where training stands in the data: the epoch, the optimizer steps taken, and the steps of this epoch done.

A checkpoint holds it (`state_dict`/`load_state_dict`), so a run continues mid-epoch with every remaining
sample read exactly once (recog/data/plan.py), on any number of ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from recog.data.plan import count_done, mark_done

log = logging.getLogger("recog")


@dataclass
class Position:
    """Where training stands: what a checkpoint records of it, besides the weights and optimizer state."""

    epoch: int = 0  # epochs finished (the one in progress, counted from 0)
    step: int = 0  # optimizer steps taken
    done: list[list[int]] = field(default_factory=list)  # steps of this epoch trained on: [start, stop) ranges
    batches_per_epoch: int = 0  # steps per epoch
    layout: dict = field(default_factory=dict)  # what a mid-epoch position is valid for: global batch, micro-batches
    world_size: int = 1  # saved beside it: a resume on another number of ranks says so

    @property
    def mid_epoch(self) -> bool:
        return bool(self.done)

    @property
    def steps_done(self) -> int:
        return count_done(self.done)

    @property
    def epoch_done(self) -> bool:
        """Every step of this epoch trained on: its end-of-epoch checkpoint follows."""
        return self.steps_done >= self.batches_per_epoch

    @property
    def schedule_step(self) -> int:
        """Where the LR schedule stands: the data trained on, in steps of this run's global batch. Equal to `step`
        in a run whose global batch never changed; after a resume with another global batch, `step` (what the
        checkpoints and TensorBoard count, never going back) still counts the old run's smaller or larger steps."""
        return self.epoch * self.batches_per_epoch + self.steps_done

    def advance(self, step: int) -> None:
        """One more optimizer step taken, on the epoch's step `step`."""
        self.step += 1
        self.done = mark_done(self.done, step)

    def next_epoch(self) -> None:
        self.epoch, self.done = self.epoch + 1, []

    def __str__(self) -> str:
        return f"step {self.step}, {self.epoch} epoch(s) done" + (
            f" and {self.steps_done} of {self.batches_per_epoch} steps of epoch {self.epoch + 1}"
            if self.mid_epoch else "")

    @staticmethod
    def saved_layout(state: dict) -> dict:
        """The layout a checkpoint's position was saved with (its global batch, ...: what build_data keeps)."""
        return state["data"]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step,
                "data": {"done": self.done, "world_size": self.world_size, **self.layout}}

    def load_state_dict(self, state: dict) -> None:
        """The saved epoch and step; the saved steps of the epoch done only if they are steps of this run's
        layout (its global batch and micro-batches: the world size may differ), else the epoch starts again."""
        saved = state["data"]
        done = []
        if saved["done"]:
            was = {key: saved.get(key) for key in self.layout}
            if "folders" not in saved and len(self.layout.get("folders") or ()) == 1:
                was["folders"] = self.layout["folders"]  # saved before recog read lists: of one folder, no mix
            if was == self.layout:
                done = [list(r) for r in saved["done"]]
            else:  # the steps of another global batch or batch size: not this run's
                log.warning("the checkpoint's mid-epoch data position was saved with %s; this run has %s, so epoch "
                            "%d starts again from its first step", {k: saved.get(k) for k in self.layout},
                            self.layout, state["epoch"] + 1)
        self.epoch, self.step, self.done = state["epoch"], state["step"], done
        if saved.get("global_batch", self.layout.get("global_batch")) != self.layout.get("global_batch"):
            log.info("global batch changed from %d to %d: the LR schedule continues at its step %d (%d epoch(s) "
                     "of %d steps trained), not at the checkpoint's step %d", saved["global_batch"],
                     self.layout["global_batch"], self.schedule_step, self.epoch, self.batches_per_epoch, self.step)
        if saved["world_size"] != self.world_size:
            log.info("world size changed from %d to %d: the %d micro-batches of each step are read by %d rank(s) now; "
                     "the global batch, the LR schedule and the epoch's samples stay as they were",
                     saved["world_size"], self.world_size, self.layout.get("micro_batches", 0), self.world_size)
