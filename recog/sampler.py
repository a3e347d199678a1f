"""DistributedBatchSampler: class-balanced P×K batches for metric learning, correct across ranks. Pure logic.

Every rank computes the same global schedule from (seed, epoch) and takes its
own part of it, so no process group is needed to agree, and the rule is:

- A step has `world_size × P` class slots. Classes are dealt from a shuffled
  deck of all classes (a new deck when the rest of the current one is too
  short for a whole step); rank r takes slots r·P … r·P+P−1. With at least
  world_size × P classes, the classes of one step are all different, so the
  ranks' batches share no class and no sample; with fewer, a class can appear
  twice in a step (with different samples while the class has enough).
- Each class keeps a shuffled queue of its samples; a slot takes the next K.
  When a queue runs out it is reshuffled and starts again, so a class with
  fewer than K samples repeats samples within its slot (sampling with
  replacement, in effect), and no class is ever skipped.
- An epoch has `len(labels) // (world_size × P × K)` steps (at least 1) on
  every rank: about one pass over the data.
- `state_dict()` records (seed, epoch, batches yielded); `load_state_dict()`
  continues mid-epoch with exactly the batches that were still to come.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from recog.errors import ConfigError


class DistributedBatchSampler:
    def __init__(self, labels: Sequence[int], p: int, k: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, steps_per_epoch: int | None = None):
        if p < 1 or k < 1:
            raise ConfigError(f"sampler P={p}, K={k}: both must be at least 1.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ConfigError("the sampler got no samples; check the data set.")
        self.p, self.k, self.rank, self.world_size, self.seed = p, k, rank, world_size, seed
        # samples of each class, as one array sorted by class plus the start of each class
        self._order = np.argsort(labels, kind="stable")
        self.classes, self._starts, self._counts = np.unique(labels[self._order], return_index=True,
                                                             return_counts=True)
        self.steps = steps_per_epoch or max(1, len(labels) // (world_size * p * k))
        self.epoch, self._done = 0, 0

    def set_epoch(self, epoch: int, consumed: Sequence[int] = ()) -> None:
        """Start `epoch`; `consumed` (batches already trained on, as counted by the training loop,
        which may be fewer than the loader fetched ahead) resumes mid-epoch after them."""
        self.epoch, self._done = epoch, sum(consumed)

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self._done}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ConfigError(f"the sampler state was saved with seed {state['seed']}, this run uses {self.seed}; "
                              "resume with the same seed.")
        self.epoch, self._done = state["epoch"], state["batches_done"]

    def _global_schedule(self) -> np.ndarray:
        """(steps, world_size × P × K) sample indices: every rank's batch of every step of this epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n_classes, per_step = len(self.classes), self.world_size * self.p
        slots = self.steps * per_step
        if n_classes >= per_step:  # deal from shuffled decks; a new deck rather than split one step across two
            decks, deck, used = [], rng.permutation(n_classes), 0
            for _ in range(self.steps):
                if used + per_step > n_classes:
                    deck, used = rng.permutation(n_classes), 0
                decks.append(deck[used : used + per_step])
                used += per_step
            deck = np.concatenate(decks)
        else:  # fewer classes than slots in a step: classes repeat within the step
            deck = np.concatenate([rng.permutation(n_classes) for _ in range(-(-slots // n_classes))])[:slots]
        # Each class's slots, in deck order, take consecutive K-runs of that class's queue: a fresh
        # permutation of its samples, followed by another whenever one is used up.
        out = np.empty((slots, self.k), dtype=np.int64)
        slots_by_class = np.argsort(deck, kind="stable")
        per_class = np.bincount(deck, minlength=n_classes)
        first = 0
        for c in np.flatnonzero(per_class):
            members = self._order[self._starts[c] : self._starts[c] + self._counts[c]]
            need = per_class[c] * self.k
            queue = np.concatenate([rng.permutation(members) for _ in range(-(-need // len(members)))])
            out[slots_by_class[first : first + per_class[c]]] = queue[:need].reshape(-1, self.k)
            first += per_class[c]
        return out.reshape(self.steps, self.world_size * self.p * self.k)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.p * self.k
        schedule = self._global_schedule()[:, self.rank * per_rank : (self.rank + 1) * per_rank]
        while self._done < self.steps:
            batch = schedule[self._done].tolist()
            self._done += 1
            yield batch
