"""Run under `torchrun --nproc_per_node=2`: checks of recog.dist with a real gloo process group.

Writes one JSON file per rank into the folder given as argv[1]; test_dist.py reads them.
"""

import json
import os
import sys
from pathlib import Path

import torch

from recog import dist
from recog.errors import ConfigError

out = Path(sys.argv[1])
ctx = dist.setup(timeout_s=60)
report = {"rank": ctx.rank, "world_size": ctx.world_size, "backend": ctx.backend}


def read_on_rank0():
    (out / f"read-by-{ctx.rank}").touch()  # leaves a trace of which ranks ran this
    return {"w": torch.arange(4.0) + 10}


report["received"] = dist.run_on_rank0(read_on_rank0, ctx, "reading")["w"].tolist()

try:  # an unexpected error on rank 0: raised there as it is (traceback), told to rank 1 in a sentence
    dist.run_on_rank0(lambda: (_ for _ in ()).throw(FileNotFoundError("no such file")), ctx, "reading weights")
except (ConfigError, FileNotFoundError) as e:
    report["error"] = f"{type(e).__name__}: {e}"


def rank1_finds_a_mistake():
    if ctx.rank == 1:
        raise ConfigError("only rank 1 sees this; fix it.")


try:  # a mistake found by rank 1 only: every rank raises rank 1's sentence
    dist.fail_together(rank1_finds_a_mistake, ctx, "checking")
except ConfigError as e:
    report["together"] = str(e)


bn = torch.nn.BatchNorm1d(3)
bn.running_mean.fill_(float(ctx.rank + 1))
dist.broadcast_buffers(bn)
report["running_mean_after_broadcast"] = bn.running_mean.tolist()
report["sum_of_ranks"] = dist.all_reduce_sum(torch.tensor([float(ctx.rank)])).item()

# Cross-rank mining: a loss on the gathered global batch gives each rank the gradient slice that a
# single process computing on the whole global batch would get.
torch.manual_seed(0)
everyone = torch.randn(2 * 6, 4, dtype=torch.float64)  # the global batch, known to all ranks in this check
labels = torch.arange(12) % 3


def pairwise_loss(x, y):  # any loss that couples samples across the batch
    d = torch.cdist(x, x)
    same = (y[:, None] == y[None, :]).double()
    return (same * d**2 + (1 - same) * torch.relu(2.0 - d) ** 2).mean()


full = everyone.clone().requires_grad_(True)
pairwise_loss(full, labels).backward()
mine = everyone[ctx.rank * 6 : (ctx.rank + 1) * 6].clone().requires_grad_(True)
gathered = dist.all_gather_with_grad(mine)
(pairwise_loss(gathered, labels) * ctx.world_size).backward()
report["gather_equals_global"] = torch.equal(gathered.detach(), everyone)
# DDP would average the ranks' parameter gradients; the embedding gradient is this rank's slice times world size
report["grad_max_diff"] = (mine.grad / ctx.world_size - full.grad[ctx.rank * 6 : (ctx.rank + 1) * 6]).abs().max().item()

uneven = torch.arange(3 + ctx.rank, dtype=torch.float32)[:, None] + 10 * ctx.rank  # 3 rows on rank 0, 4 on rank 1
report["gathered_uneven"] = dist.all_gather_uneven(uneven)[:, 0].tolist()

# The per-step agreement (AnyRankFlag through StopOnSignal): rank 0's clock flag raised at call 2 only, a signal
# caught by rank 1 alone before call `caught_at`; what each call returned, [stop, minutes up].
from recog.preempt import StopOnSignal  # noqa: E402


def agreement(flag: dist.AnyRankFlag, calls: int, caught_at: int) -> list[list[bool]]:
    stop, agreed = StopOnSignal(flag), []
    for call in range(calls):
        if ctx.rank == 1 and call == caught_at:
            stop.caught = "SIGUSR1"
        agreed.append(list(stop.agreed_with(ctx.rank == 0 and call == 2)))
    stop.finish()
    return agreed


# Posting every call (seconds=0): every rank learns each flag one call later, at the same call.
report["agreed"] = agreement(dist.AnyRankFlag(seconds=0), calls=6, caught_at=4)
# With a gap: these calls take far less than 60 s / 3, so after the first post (which proposes 1) every rank
# proposes 3 calls. Posts at calls 0, 1 and 4 (read at 1, 2 and 5): rank 1's signal, caught before call 3, goes out
# with the post at call 4 and every rank learns it at call 5; rank 0's flag, up at call 2 only, is never posted.
report["agreed_gap"] = agreement(dist.AnyRankFlag(seconds=60, max_calls=3), calls=8, caught_at=3)

from accumulation import accumulation_max_difference  # noqa: E402  (DDP with no_sync on 3 of 4 micro-steps)

report["accumulation_max_diff"] = accumulation_max_difference(ctx)

(out / f"rank{ctx.rank}.json").write_text(json.dumps(report))
dist.teardown()
# Leave without the interpreter's finalization: about one run in ten under load (b3c8ef3 too), a C++ thread was
# destroyed while joinable after the last Python frame ("terminate called without an active exception", SIGABRT,
# no Python frame in faulthandler's dump), which failed this check after every result above was written. What
# leaves that thread behind is not found yet (docs: the closing note); this check is of the collectives.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
