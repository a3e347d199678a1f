"""Run under `torchrun --nproc_per_node=2`: a proxy loss's proxies under recog's DDP (StepRecipe.distribute).

Each rank starts from its own random proxies and model and trains on its own batches; every rank writes what
it holds before and after into the folder given as argv[1]. test_loss.py reads them.
"""

import sys
from pathlib import Path

import torch
from accumulation import TinyModel
from omegaconf import OmegaConf
from pytorch_metric_learning.losses import ProxyAnchorLoss

from recog import dist
from recog.build import parameter_groups
from recog.data.loader import Batch
from recog.data.position import Position
from recog.log import NullWriter
from recog.loss import RecognitionLoss
from recog.step import StepRecipe
from recog.train import StepLog, train_one_epoch

out = Path(sys.argv[1])
ctx = dist.setup(timeout_s=60)
torch.manual_seed(ctx.rank)  # other weights and proxies on each rank: DDP must make them rank 0's
model = TinyModel()
loss_fn = RecognitionLoss(metric=ProxyAnchorLoss(num_classes=3, embedding_size=8), metric_weight=1.0, lr_scale=10.0)
before = {"proxies": loss_fn.metric.proxies.detach().clone(), "embed": model.embed.weight.detach().clone()}
optimizer = torch.optim.SGD(parameter_groups(model, loss_fn, lr=0.1), lr=0.1, momentum=0.9)
recipe = StepRecipe(model, optimizer, loss_fn)
cfg = OmegaConf.create({"ddp": {"bucket_cap_mb": 25, "static_graph": False, "gradient_as_bucket_view": False,
                                "comm_hook": None}, "perf": {"compile": False}})
recipe.distribute(ctx, cfg.perf, cfg.ddp)
g = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own batches
batches = [Batch(torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8, generator=g),
                 torch.randint(0, 3, (12,), generator=g), 0) for _ in range(6)]
stats = train_one_epoch(recipe, batches, Position(batches_per_epoch=len(batches)), StepLog(NullWriter(), 10**6),
                        after_step=lambda position: False)
torch.save({"before": before, "steps": stats.step, "proxies": loss_fn.metric.proxies.detach().clone(),
            "model": {k: v.clone() for k, v in model.state_dict().items()}}, out / f"rank{ctx.rank}.pt")
dist.teardown()
