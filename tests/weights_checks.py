"""Run under `torchrun --nproc_per_node=N`: build a run's step recipe as recog/train.py does (build_data, then
build_recipe, which reads weights= and imprints the new classes), and save what this rank holds before DDP copies
rank 0's weights anywhere: the classifier's rows and the loss's class rows.

argv[1]: the folder for `rank-R.pt`; the rest: the run's config overrides. test_weights_by_name.py reads them.
"""

import sys
from pathlib import Path

import torch

from recog import dist
from recog.build import build_data, build_recipe
from recog.rundir import compose_train_config

out = Path(sys.argv[1])
cfg = compose_train_config(*sys.argv[2:])
ctx = dist.setup(timeout_s=120)
torch.manual_seed(ctx.rank)  # fresh rows differ between the ranks: only what is loaded or imprinted is equal
try:
    data = build_data(cfg, ctx)
    recipe = build_recipe(cfg, ctx, data)
    torch.save({"class_weights": recipe.model.class_weights.detach().clone(),
                "loss": {name: p.detach().clone() for name, p in recipe.loss_fn.class_rows().items()},
                "classes": data.classes, "mean": list(cfg.data.mean), "std": list(cfg.data.std)},
               out / f"rank-{ctx.rank}.pt")
finally:
    dist.teardown()
