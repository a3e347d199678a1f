"""DistributedBatchSampler: class-balanced P×K batches for metric learning, correct across ranks. Pure logic.

Every rank computes the same global schedule from (seed, epoch) and takes its
own share of it, so no process group is needed to agree, and the rule is:

- A step has `micro_batches` batches of P×K (the global batch / (P×K), fixed
  for a run; by default the world size), so `micro_batches × P` class slots.
  Classes are dealt from a shuffled deck of all classes (a new deck when the
  rest of the current one is too short for a whole step); micro-batch q takes
  slots q·P … q·P+P−1, and a rank takes the micro-batches
  `recog.data.plan.rank_micro_batches` gives it. With at least
  micro_batches × P classes, the classes of one step are all different, so
  the micro-batches share no class and no sample; with fewer, a class can
  appear twice in a step (with different samples while the class has enough). The schedule
  does not depend on the world size: a run resumed on another number of ranks
  continues with exactly the batches still to come.
- Each class keeps a shuffled queue of its samples; a slot takes the next K.
  When a queue runs out it is reshuffled and starts again, so a class with
  fewer than K samples repeats samples within its slot (sampling with
  replacement, in effect), and no class is ever skipped.
- An epoch has `len(labels) // (micro_batches × P × K)` steps (at least 1) on
  every rank: about one pass over the data.
- Iterating yields, for each step not yet done, `(step, [indices of each of
  this rank's micro-batches])`: `ShardRandomAccess.__getitems__` reads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from recog.data.plan import is_done, rank_micro_batches
from recog.errors import ConfigError


class DistributedBatchSampler:
    def __init__(self, labels: Sequence[int], p: int, k: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, micro_batches: int | None = None, steps_per_epoch: int | None = None):
        if p < 1 or k < 1:
            raise ConfigError(f"sampler P={p}, K={k}: both must be at least 1.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ConfigError("the sampler got no samples; check the data set.")
        self.p, self.k, self.rank, self.world_size, self.seed = p, k, rank, world_size, seed
        self.micro_batches = micro_batches or world_size
        # samples of each class, as one array sorted by class plus the start of each class
        self._order = np.argsort(labels, kind="stable")
        self.classes, self._starts, self._counts = np.unique(labels[self._order], return_index=True,
                                                             return_counts=True)
        self.steps = steps_per_epoch or max(1, len(labels) // (self.micro_batches * p * k))
        self.epoch, self.done = 0, []

    def set_epoch(self, epoch: int, done: Sequence[Sequence[int]] = ()) -> None:
        """Start `epoch`; `done` (the steps already trained on, as [start, stop) ranges, as counted by the
        training loop, which may be fewer than the loader fetched ahead) resumes mid-epoch without them."""
        self.epoch, self.done = epoch, [list(r) for r in done]

    def __len__(self) -> int:
        return self.steps - sum(min(stop, self.steps) - start for start, stop in self.done)

    def _global_schedule(self) -> np.ndarray:
        """(steps, micro_batches, P × K) sample indices: every micro-batch of every step of this epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n_classes, per_step = len(self.classes), self.micro_batches * self.p
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
        return out.reshape(self.steps, self.micro_batches, self.p * self.k)

    def __iter__(self) -> Iterator[tuple[int, list[list[int]]]]:
        mine = rank_micro_batches(self.micro_batches, self.rank, self.world_size)
        schedule = self._global_schedule()[:, mine.start : mine.stop]
        for step in range(self.steps):
            if not is_done(self.done, step):
                yield step, schedule[step].tolist()
