"""Run under `torchrun --nproc_per_node=N`: build a run's step recipe as recog/train.py does (build_data, then
build_recipe, which reads weights= and imprints the new classes), and save what this rank holds before DDP copies
rank 0's weights anywhere: the classifier's rows and the loss's class rows; with model.classifier=sharded, this
rank's rows ("rows", of the classes "held") and the model (the backbone). Its log lines go to stderr.

argv[1]: the folder for `rank-R.pt`; the rest: the run's config overrides. test_weights_by_name.py and
test_sharded_weights.py read them.
"""

import logging
import sys
from pathlib import Path

import torch

from recog import dist
from recog.build import build_data, build_recipe
from recog.rundir import compose_train_config

out = Path(sys.argv[1])
cfg = compose_train_config(*sys.argv[2:])
ctx = dist.setup(timeout_s=120)
logging.basicConfig(level=logging.INFO, format=f"rank {ctx.rank}: %(message)s")
torch.manual_seed(ctx.rank)  # fresh rows differ between the ranks: only what is loaded or imprinted is equal
try:
    data = build_data(cfg, ctx)
    recipe = build_recipe(cfg, ctx, data)
    held = {"classes": data.classes, "mean": list(cfg.data.mean), "std": list(cfg.data.std)}
    classifier = recipe.sharded_classifier()
    if classifier is not None:
        held.update(rows=classifier.weight.detach().clone(), held=[classifier.classes.start, classifier.classes.stop],
                    model=recipe.model.state_dict())
    else:
        held.update(class_weights=recipe.model.class_weights.detach().clone(),
                    loss={name: p.detach().clone() for name, p in recipe.loss_fn.class_rows().items()})
    torch.save(held, out / f"rank-{ctx.rank}.pt")
finally:
    dist.teardown()
