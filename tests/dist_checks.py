"""Run under `torchrun --nproc_per_node=2`: checks of recog.dist with a real gloo process group.

Writes one JSON file per rank into the folder given as argv[1]; test_dist.py reads them.
"""

import json
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

try:
    dist.run_on_rank0(lambda: (_ for _ in ()).throw(FileNotFoundError("no such file")), ctx, "reading weights")
except ConfigError as e:
    report["error"] = str(e)

report["all_ok_when_all_ok"] = dist.all_ok(True, ctx)
report["all_ok_when_rank1_fails"] = dist.all_ok(ctx.rank != 1, ctx)

bn = torch.nn.BatchNorm1d(3)
bn.running_mean.fill_(float(ctx.rank + 1))
dist.broadcast_buffers(bn)
report["running_mean_after_broadcast"] = bn.running_mean.tolist()
report["sum_of_ranks"] = dist.all_reduce_sum(torch.tensor([float(ctx.rank)])).item()

(out / f"rank{ctx.rank}.json").write_text(json.dumps(report))
dist.teardown()
