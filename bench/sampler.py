"""DistributedBatchSampler (P×K) against torch's DistributedSampler + BatchSampler over the same indices.

    python bench/sampler.py                       # 1M samples in 10k classes, P=32, K=4, 8 ranks

Both produce one rank's batches of index lists for a whole epoch (including
each epoch's shuffling), alternating over rounds; prints batches/s of each and
the ratio. The P×K sampler does more work (class-balanced, K per class,
schedule shared by all ranks); what matters is that it stays far above the
training's steps/s.
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import medians, rounds, timed
from torch.utils.data import BatchSampler, DistributedSampler

from recog.data.sampler import DistributedBatchSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--p", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    labels = np.random.default_rng(0).integers(0, args.classes, args.samples)  # uneven class sizes
    batch = args.p * args.k
    ours = DistributedBatchSampler(labels, args.p, args.k, rank=0, world_size=args.world_size)
    torch_sampler = DistributedSampler(range(args.samples), num_replicas=args.world_size, rank=0, shuffle=True)
    theirs = BatchSampler(torch_sampler, batch, drop_last=True)

    batches = {}  # name: batches in an epoch

    def epoch_rate(name, sampler, set_epoch):
        def run(epoch):
            set_epoch(epoch)
            batches[name], seconds = timed(lambda: sum(1 for _ in sampler))
            return batches[name] / seconds
        return run

    # rotate=False: P×K first in every round, the order this benchmark has always measured in
    rates = rounds({"ours": epoch_rate("ours", ours, ours.set_epoch),
                    "theirs": epoch_rate("theirs", theirs, torch_sampler.set_epoch)}, args.rounds, rotate=False)
    med = medians(rates)
    a, b, n_ours, n_theirs = med["ours"], med["theirs"], batches["ours"], batches["theirs"]
    print(f"{args.samples:,} samples, {args.classes:,} classes, batch {args.p}x{args.k}, rank 0 of {args.world_size}: "
          f"{n_ours} P×K batches vs {n_theirs} plain batches per epoch")
    print(f"DistributedBatchSampler (P×K): {a:,.0f} batches/s ({a * batch:,.0f} samples/s)")
    print(f"DistributedSampler + BatchSampler: {b:,.0f} batches/s")
    print(f"ratio P×K / plain = {a / b:.3f}")


if __name__ == "__main__":
    main()
