"""weights= from a recog checkpoint trained on other classes: its classifier (and a proxy loss's proxies) mapped to
this run's classes by name, and each new class's row imprinted.

Known classes keep their rows (moved to their index in this run), classes this run has not are dropped, and a new
class's row starts from the mean L2-normalised embedding of up to `imprint_images` of its training images (weight
imprinting: Qi, Brown and Lowe, "Low-Shot Learning with Imprinted Weights", CVPR 2018), so that it is recognised
from the first step instead of from a random row. The rows are made on every rank before the first step: each rank
embeds its share of the chosen images, the sums and counts are added up over the ranks, and every rank holds the
same rows, whether or not DDP then copies rank 0's. The model itself knows nothing of ranks (recog/model.py maps
the rows); this module does the distributed part.

model.classifier=sharded (recog.sharded): each rank holds the rows of its slice of this run's classes, so each
fills those alone: a kept class's row from the weights' classifier (found by name: the names are sorted, so a new
class may fall anywhere and move every later class to another rank), a new class's from the same imprinting (every
rank takes part in it, then keeps its slice's means). The weights' rows may be a replicated classifier's
(model["class_weights"], handed to every rank) or a sharded one's, in the folder beside the checkpoint: there each
rank reads only the rows its slice maps to, a few contiguous spans of the files (recog.classifier_files), never
the whole classifier. A replicated run from a sharded checkpoint reads all of them: it holds them all anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recog import classifier_files, dist
from recog.checkpoint import classifier_rows_folder, load_checkpoint, trained_class_names
from recog.data.random_access import ShardRandomAccess
from recog.errors import ConfigError
from recog.loss import RecognitionLoss
from recog.model import ClassMap, RecognitionModel, load_weights, map_classes, move_rows
from recog.sharded import ShardedLoss

log = logging.getLogger("recog")

BATCH = 256  # images embedded per forward pass while imprinting
# A sharded classifier's saved rows are read in contiguous spans: a gap of up to this many rows nobody asked for
# (dropped classes) is read through rather than starting another span (each read_rows call checks slices.json and
# every file's size): at most 8 MB of 512-d fp32 rows.
GAP_ROWS = 4096


def is_recog_checkpoint(weights: dict) -> bool:
    """Written by train.py (a model and the config it was trained with), rather than a bare state dict."""
    return isinstance(weights.get("model"), dict) and isinstance(weights.get("config"), dict)


def read_weights(path: str) -> dict:
    """weights= read, on rank 0 (whose result every rank is handed): for a recog checkpoint, the names of its
    classifier's rows are settled here too ("trained_classes"), so that every rank maps the rows alike (an older
    checkpoint's names may come from a manifest on rank 0's disk alone). A sharded classifier's rows stay in their
    folder: its slices.json is checked here, and "classifier_folder" says where it is and what it holds (each rank
    reads its rows later)."""
    weights = load_checkpoint(path, "weights=")
    if not is_recog_checkpoint(weights):
        return weights
    folder = classifier_rows_folder(Path(path).absolute(), weights)
    if folder is not None:
        layout = classifier_files.read_layout(folder)
        kind = layout["tensors"].get("weight")
        if kind is None or len(kind["shape"]) != 1:
            raise ConfigError(f"{folder} holds no classifier rows named weight (it holds {sorted(layout['tensors'])}); "
                              "give weights= a checkpoint train.py wrote.")
        weights["classifier_folder"] = {"path": str(folder), "total": layout["total"], "width": kind["shape"][0],
                                        "dtype": kind["dtype"]}
    count = saved_row_count(weights)
    if count is not None:
        weights["trained_classes"] = trained_class_names(weights, count)
    return weights


def saved_row_count(weights: dict) -> int | None:
    """How many rows (classes) the weights' classifier has: its model's class_weights, or the folder of a sharded
    one's (read_weights); None: it holds none."""
    rows = weights["model"].get("class_weights")
    if rows is not None:
        return rows.shape[0]
    folder = weights.get("classifier_folder")
    return folder["total"] if folder else None


def class_map(weights: dict, classes: Sequence[str]) -> tuple[ClassMap | None, str | None]:
    """How this run's `classes` take the checkpoint's classifier rows, and a note when that was assumed: by name
    (checkpoint.trained_class_names); without names, for the same number of classes, in the same order; else None
    (load_weights then starts the classifier fresh, and says so)."""
    count = saved_row_count(weights)
    if count is None:
        return None, None
    names, found = weights.get("trained_classes") or trained_class_names(weights, count)
    if names is not None:
        return map_classes(names, classes, f"names from the {found}"), None
    if count == len(classes):
        return map_classes(classes, classes, "names assumed"), (
            f"{found}: its {count} classes are taken to be this data's {len(classes)}, in the same order")
    return None, None


def spans(rows: np.ndarray, gap: int) -> list[range]:
    """Contiguous ranges that cover `rows` (row numbers, any order, repeats allowed), two joined where at most `gap`
    rows lie between them."""
    rows = np.unique(rows)
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) > gap + 1)
    starts, stops = np.r_[rows[0], rows[breaks + 1]], np.r_[rows[breaks] + 1, rows[-1] + 1]
    return [range(int(a), int(b)) for a, b in zip(starts, stops)]


def saved_rows(weights: dict, rows: Sequence[int]) -> torch.Tensor:
    """The weights' classifier rows `rows` (its row numbers), in that order, on the CPU: from its model's
    class_weights, or read from a sharded classifier's folder a few contiguous `spans` at a time (only those rows
    of only the files that hold them, without their optimizer state), so that a rank reads about as many rows as it
    asked for, never the whole classifier."""
    index = torch.as_tensor(list(rows), dtype=torch.int64)
    held = weights.get("model", weights).get("class_weights")
    if held is not None:
        return held[index]
    folder = weights["classifier_folder"]
    out = torch.empty(len(index), folder["width"], dtype=classifier_files.TORCH_DTYPES[folder["dtype"]])
    order = torch.argsort(index)
    ordered = index[order]
    for span in spans(index.numpy(), GAP_ROWS):
        part = classifier_files.read_rows(folder["path"], span, total=folder["total"], names=["weight"])["weight"]
        lo, hi = torch.searchsorted(ordered, torch.tensor([span.start, span.stop])).tolist()
        out[order[lo:hi]] = part[ordered[lo:hi] - span.start]
        del part  # a view of the file's map: let it go before the next
    return out


def choose_images(labels: np.ndarray, new: Sequence[int], per_class: int, seed: int) -> dict[int, np.ndarray]:
    """Up to `per_class` training images of each new class (class index -> sample indices, sorted): a seeded
    choice, each class's drawn on its own (the same whatever the other classes, the ranks or the workers)."""
    chosen = {}
    for c in new:
        found = np.flatnonzero(labels == c)
        if len(found) > per_class:
            found = np.random.default_rng([seed, c]).choice(found, size=per_class, replace=False)
        chosen[c] = np.sort(found)
    return chosen


@torch.no_grad()
def embedding_sums(model: RecognitionModel, images: ShardRandomAccess, chosen: dict[int, np.ndarray],
                   normalize: Callable, device: torch.device, rank: int = 0, world_size: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the chosen images (every `world_size`-th, from `rank`) embedded by the model in eval
    mode: for each class of `chosen`, in its order, the sum of their L2-normalised embeddings (float64) and their
    count. An unreadable image is left out (the dataset logs it)."""
    work = sorted((int(i), slot) for slot, indices in enumerate(chosen.values()) for i in indices)[rank::world_size]
    sums = torch.zeros(len(chosen), model.embed.out_features, dtype=torch.float64, device=device)
    counts = torch.zeros(len(chosen), dtype=torch.float64, device=device)
    training = model.training
    model.eval()  # BatchNorm's running statistics: each image's embedding is its own, whatever the batch
    for start in range(0, len(work), BATCH):
        items = [(images[i], slot) for i, slot in work[start:start + BATCH]]
        items = [(item[0], slot) for item, slot in items if item is not None]
        if not items:
            continue
        slots = torch.tensor([slot for _, slot in items], device=device)
        batch = torch.stack([image for image, _ in items]).to(device)
        sums.index_add_(0, slots, model(normalize(batch)).embeddings.double())
        counts.index_add_(0, slots, torch.ones(len(items), dtype=torch.float64, device=device))
    model.train(training)
    return sums, counts


def imprinted_rows(model: RecognitionModel, images: Callable[[], ShardRandomAccess], new: Sequence[int],
                   per_class: int, seed: int, normalize: Callable, ctx: dist.Dist
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The new classes imprinted (`choose_images`'s classes, in order), each one's mean L2-normalised embedding
    over its chosen images (float64), the same on every rank, and how many images each mean is of (0: no readable
    training image). Every rank calls this."""
    def mine():
        try:
            samples = images()
        except ConfigError as e:  # remote shards without a node cache, a folder without index.npz, ...: this
            # rank adds nothing (a class no rank could read starts fresh, and the log line names it)
            log.warning("imprinting: the training shards cannot be read by index here (%s); this rank adds no "
                        "image to the new classes' rows", e)
            zeros = torch.zeros(len(new), model.embed.out_features, dtype=torch.float64, device=ctx.device)
            return list(new), zeros, zeros[:, 0].clone()
        chosen = choose_images(samples.labels, new, per_class, seed)
        return list(chosen), *embedding_sums(model, samples, chosen, normalize, ctx.device, ctx.rank, ctx.world_size)

    classes, sums, counts = dist.fail_together(mine, ctx, "imprinting the new classes")
    sums, counts = dist.all_reduce_sum(sums), dist.all_reduce_sum(counts)
    return classes, sums / counts.clamp(min=1)[:, None], counts


def load_loss_rows(loss_fn: nn.Module, saved: dict, mapping: ClassMap) -> tuple[dict[str, nn.Parameter], list[str]]:
    """The loss's class rows (RecognitionLoss.class_rows: a proxy loss's proxies) taken from the checkpoint's loss
    state through `mapping` as the classifier's are; those it does not hold (another loss) start fresh. Returns the
    parameters mapped, by name, and a note for each one that starts fresh."""
    rows = loss_fn.class_rows() if isinstance(loss_fn, RecognitionLoss) else {}
    mapped, notes = {}, []
    for name, param in rows.items():
        value = saved.get(name)
        if value is None or tuple(value.shape) != (mapping.saved, param.shape[1]):
            held = "holds none" if value is None else f"holds {tuple(value.shape)}"
            notes.append(f"the loss's {name} start fresh (the checkpoint {held})")
            continue
        with torch.no_grad():
            param.copy_(move_rows(value, param, mapping))
        mapped[name] = param
    return mapped, notes


def start_from_weights(weights: dict, name: str, classes: Sequence[str], model: RecognitionModel, loss_fn: nn.Module,
                       images: Callable[[], ShardRandomAccess] | None, per_class: int, seed: int, ctx: dist.Dist,
                       normalize: Callable) -> None:
    """Load `weights` (read from `name`, handed to every rank) into the model (and the loss's class rows), the
    classifier mapped to this run's `classes` by name and each new class imprinted from up to `per_class` of its
    training images (`images()`: the training samples by index, labelled in the run's class order; None: none to
    read), chosen with `seed`. Every rank calls this, with the same weights: the rows come out the same on all."""
    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 0:
        raise ConfigError(f"imprint_images={per_class!r} is not a number of images; give a whole number >= 0 (the "
                          "training images each new class's row is imprinted from; 0: new classes start fresh).")
    mapping, assumed = class_map(weights, classes) if is_recog_checkpoint(weights) else (None, None)
    if isinstance(loss_fn, ShardedLoss):
        notes = start_slice_from_weights(weights, mapping, classes, model, loss_fn, images, per_class, seed,
                                         ctx, normalize)
        for note in ([assumed] if assumed else []) + notes:
            log.info("weights %s: %s", name, note)
        return
    if mapping is not None and "class_weights" not in weights["model"]:  # a sharded classifier's rows, in a folder:
        # this run holds every row, so every rank reads them all
        weights["model"]["class_weights"] = dist.fail_together(
            lambda: saved_rows(weights, range(mapping.saved)), ctx, "reading the weights' classifier rows")
    notes = load_weights(model, weights, mapping) + ([assumed] if assumed else [])
    if mapping is not None:
        loss_rows, loss_notes = load_loss_rows(loss_fn, weights.get("loss") or {}, mapping)
        how = imprint_new_classes(model, [model.class_weights, *loss_rows.values()], mapping, classes, images,
                                  per_class, seed, ctx, normalize)
        others = [f"the loss's {row} likewise" for row in loss_rows] + loss_notes
        notes.append(f"classifier mapped by class name ({mapping.names_from}): {len(mapping.kept)} kept, "
                     f"{len(mapping.new)} new{how}, {len(mapping.dropped)} dropped" + "".join(f"; {o}" for o in others))
    for note in notes:
        log.info("weights %s: %s", name, note)


def start_slice_from_weights(weights: dict, mapping: ClassMap | None, classes: Sequence[str], model: RecognitionModel,
                             loss_fn: ShardedLoss, images: Callable[[], ShardRandomAccess] | None,
                             per_class: int, seed: int, ctx: dist.Dist, normalize: Callable) -> list[str]:
    """start_from_weights for a sharded classifier: the model (which holds no class rows) loaded as the replicated
    path loads it, and this rank's rows, those of its slice of `classes`, taken from the weights' rows through
    `mapping` (each rank reads only the rows its slice maps to) or imprinted; a proxy loss's proxies (every class's,
    on every rank) mapped and imprinted as the replicated path does. Every rank calls this: the imprinting and the
    reads that may fail on one rank alone are collective. Returns the notes for the log."""
    classifier = loss_fn.classifier
    notes = load_weights(model, weights)  # no class rows in a model with a sharded classifier: the backbone alone
    replicated = weights.get("model", weights).get("class_weights")  # a bare state dict's too
    folder = weights.get("classifier_folder")
    width, saved_width = classifier.weight.shape[1], None
    if replicated is not None:
        saved_width = replicated.shape[1]
    elif folder:
        saved_width = folder["width"]
    if saved_width not in (None, width):  # before any collective: every rank has the same weights
        raise ConfigError(f"the weights' classifier rows are {saved_width}-d and this model's {width}-d; set "
                          f"model.embedding_dim={saved_width} to start from them.")
    if mapping is None:  # rows without class names: taken in order when they are as many, as the replicated
        # classifier takes them, else the classifier starts fresh
        count = replicated.shape[0] if replicated is not None else (folder["total"] if folder else None)
        if count == classifier.num_classes:
            rows = dist.fail_together(lambda: saved_rows(weights, classifier.classes), ctx,
                                      "reading the weights' classifier rows")
            with torch.no_grad():
                classifier.weight.copy_(rows.to(classifier.weight.device, classifier.weight.dtype))
        elif count is not None:
            notes.append(f"the weights' classifier is for {count} classes and this data has "
                         f"{classifier.num_classes}: the classifier starts fresh, the rest is loaded")
        return notes
    held = classifier.classes
    sources = [mapping.source[c] for c in held]
    kept = [i for i, row in enumerate(sources) if row >= 0]
    rows = dist.fail_together(lambda: saved_rows(weights, [sources[i] for i in kept]), ctx,
                              "reading the weights' classifier rows")
    with torch.no_grad():
        classifier.weight[kept] = rows.to(classifier.weight.device, classifier.weight.dtype)
    loss_rows, loss_notes = load_loss_rows(loss_fn, weights.get("loss") or {}, mapping)
    how = imprint_new_classes(model, [classifier.weight], mapping, classes, images, per_class, seed, ctx, normalize,
                              held, whole=list(loss_rows.values()))
    others = [f"the loss's {row} likewise" for row in loss_rows] + loss_notes
    return notes + [f"classifier mapped by class name ({mapping.names_from}): {len(mapping.kept)} kept, "
                    f"{len(mapping.new)} new{how}, {len(mapping.dropped)} dropped" + "".join(f"; {o}" for o in others)]


def imprint_new_classes(model: RecognitionModel, targets: list[nn.Parameter], mapping: ClassMap,
                        classes: Sequence[str], images: Callable[[], ShardRandomAccess] | None, per_class: int,
                        seed: int, ctx: dist.Dist, normalize: Callable, held: range | None = None,
                        whole: Sequence[nn.Parameter] = ()) -> str:
    """Each new class's row in every one of `targets` (the classifier, the loss's mapped class rows) set to its
    imprinted mean embedding; the others keep the fresh rows they were built with. `held`: the classes whose rows
    `targets` hold, from row 0 (a sharded classifier's slice); None: every class. `whole`: rows of every class
    beside a sharded slice (a proxy loss's proxies), each new class's set on every rank. Every rank imprints every new
    class (the same calls on every rank, each embedding its share of the images, so the collectives stay paired)
    and keeps those it holds: for a moment each holds new classes × D float64 sums, as the replicated path does.
    Returns how, for the log."""
    if not mapping.new:
        return ""
    if not per_class or images is None:
        return f" (starting fresh: {'imprint_images=0' if not per_class else 'no training shards to imprint from'})"
    imprinted, means, counts = imprinted_rows(model, images, mapping.new, per_class, seed, normalize, ctx)
    have = counts > 0
    rows = [c for c, ok in zip(imprinted, have.tolist()) if ok]
    held = range(len(classes)) if held is None else held
    mine = [i for i, (c, ok) in enumerate(zip(imprinted, have.tolist())) if ok and c in held]
    with torch.no_grad():
        if mine:
            for target in targets:
                target[[imprinted[i] - held.start for i in mine]] = means[mine].to(target.dtype)
        every = [i for i, ok in enumerate(have.tolist()) if ok]
        if every:
            for target in whole:
                target[[imprinted[i] for i in every]] = means[every].to(target.dtype)
    without = [classes[c] for c, ok in zip(imprinted, have.tolist()) if not ok]
    how = f"{len(rows)} imprinted from up to {per_class} images each" if without else \
        f"imprinted from up to {per_class} images each"
    if without:
        named = ", ".join(map(repr, without[:10])) + (f" and {len(without) - 10} more" if len(without) > 10 else "")
        how += f"; {len(without)} with no training image start fresh: {named}"
    return f" ({how})"
