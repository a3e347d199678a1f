"""A recog training run, top to bottom: check, set up, build, restore, train, evaluate, checkpoint, log.

Every rank runs `run(cfg)`. Rank 0 alone writes files (checkpoints, TensorBoard, metrics.json); the other
ranks log through stand-ins that do nothing. Where each thing lives: recog/config.py checks the configuration,
recog/build.py builds the data and the step recipe (recog/step.py: how one optimizer step is taken),
recog/data/position.py is where training stands in the data, recog/checkpoint.py saves and restores them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from recog import dist
from recog.build import build_data, build_recipe
from recog.checkpoint import Checkpoints, ClassifierRows, RandomState, check_resume_point, find_resume_point
from recog.config import check_config, keep_resumed_classifier
from recog.data.loader import Batch, stop_data_workers
from recog.data.position import Position
from recog.files import write_json
from recog.log import make_writer, setup_logging
from recog.model import Output
from recog.preempt import Preempted, StopOnSignal
from recog.retrieval import metrics_from_sums, retrieval_sums, undefined
from recog.rundir import hold_run_dir
from recog.sharded import ShardedClassifier, top1_in_rounds
from recog.step import StepRecipe

log = logging.getLogger("recog")


def run(cfg: DictConfig, run_dir: Path | None = None, stop: StopOnSignal | None = None) -> dict:
    """One training run on this rank. `stop`: signal handlers installed at program start (train.py);
    without it, run installs its own for the run's duration."""
    own_stop = stop is None
    stop = stop or StopOnSignal().install()
    try:
        check_config(cfg)  # every configured value, before any process group exists
        if stop.caught:  # torchrun stops every rank when one fails: it failed before this one started
            raise Preempted("stopped before training started (when one rank fails, torchrun stops the others: "
                            "see its error above)", stop.caught)
        ctx = dist.setup(cfg.dist.backend, cfg.dist.timeout_s)
        stop.flag = dist.AnyRankFlag()  # from here on the ranks agree on when to stop (and save)
        try:
            run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
            with dist.collective_failures(ctx, cfg.dist.timeout_s):
                with hold_run_dir(run_dir, ctx):  # one run at a time in it: a second one stops here, on every rank
                    metrics = train(cfg, ctx, run_dir, stop)
                stop.finish()
            return metrics
        finally:
            stop.flag = None
            dist.teardown()
    except BaseException:
        # The data-loader workers ignore the stop signals (the training process decides when to stop), so
        # Python's exit, which sends them SIGTERM and then waits, would wait forever: end them here.
        stop_data_workers()
        raise
    finally:
        if own_stop:
            stop.uninstall()


def train(cfg: DictConfig, ctx: dist.Dist, run_dir: Path, stop: StopOnSignal) -> dict:
    setup_logging(run_dir, ctx.is_main)
    if ctx.is_main:
        log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    torch.manual_seed(cfg.seed)

    # The checkpoint to continue from, if any: its global batch is kept, whatever the world size now.
    found = find_resume_point(cfg.checkpoint, cfg.resume, run_dir, ctx)
    kept = keep_resumed_classifier(cfg, found[1]) if found else None  # model.classifier=auto: as it was settled
    if kept and ctx.is_main:
        log.info("%s", kept)
    data = build_data(cfg, ctx, saved=Position.saved_layout(found[1]) if found else None)
    position = data.start(ctx.world_size)
    recipe = build_recipe(cfg, ctx, data, position)  # its LR schedule follows the position
    check_resume_point(found, run_dir, cfg.model.backbone, recipe.mismatch)
    classifier = recipe.sharded_classifier()  # its rows: each rank saves and restores its own
    checkpoints = Checkpoints(cfg.checkpoint, run_dir / "checkpoints", ctx.is_main,
                              {"position": position, "recipe": recipe, "rng": RandomState(ctx.device)},
                              config=OmegaConf.to_container(cfg, resolve=True), classes=data.classes,
                              rows=ClassifierRows(classifier, recipe.optimizer, ctx) if classifier else None)
    checkpoints.restore(found)  # in that order: the recipe's LR is this run's at the restored position
    if checkpoints.resumed_from:
        log.info("resumed from %s: %s", checkpoints.resumed_from, position)
    if position.epoch >= cfg.epochs and not position.mid_epoch:  # started again after it had finished
        log.info("nothing to train: %s holds all %d epochs (give a larger epochs= to train on)",
                 checkpoints.resumed_from, cfg.epochs)
        return {"epoch": position.epoch, "step": position.step, "top1": checkpoints.top1,
                "best_top1": checkpoints.best_top1}
    recipe.distribute(ctx, cfg.perf, cfg.ddp)  # DDP: every rank now holds rank 0's weights (the loss's too)

    def after_step(position: Position) -> bool:  # True: every rank stops after this step
        # one exchange, read a step later: a rank caught a stop signal; rank 0's clock says a checkpoint is due
        stop_now, minutes_up = stop.agreed_with(checkpoints.minutes_up())
        if stop_now:
            return True
        if not position.epoch_done:  # an epoch's last step: its end-of-epoch checkpoint follows
            checkpoints.save_if_due(position.step, minutes_up)
        return False

    # Resuming in the same run directory: TensorBoard hides what the interrupted run logged after this step (its
    # events of this step came before the checkpoint, and stay).
    writer = make_writer(run_dir, ctx.is_main, purge_step=position.step + 1 if checkpoints.resumed_from else None)
    log_steps, totals = StepLog(writer, cfg.log_every), Meter("images", "seconds", "skipped")
    stats, result = None, None
    batches = data.batches(position)
    while position.epoch < cfg.epochs:
        stats = train_one_epoch(recipe, batches, position, log_steps, after_step)
        totals.add(images=stats.images, seconds=stats.seconds, skipped=stats.skipped)
        if stats.stopped:  # SIGTERM/SIGUSR1: every rank stopped after this same step
            raise preempted(checkpoints, position, stop.caught, writer)
        position.next_epoch()
        if position.epoch < cfg.epochs:  # the workers fill their queue with the next epoch while we evaluate
            batches = data.batches(position)
        dist.broadcast_buffers(recipe.model)  # rank 0's BatchNorm statistics everywhere: one model is evaluated
        result = evaluate(recipe.model, data.test_loader, recipe.normalize, ctx, retrieval=cfg.eval.retrieval,
                          keep_images=cfg.eval.projector if position.epoch == cfg.epochs else 0,
                          gallery_loader=data.gallery_loader, classifier=classifier)
        report_epoch(writer, cfg.epochs, position, stats, with_ema(result, recipe, data.test_loader, ctx), data.classes)
        checkpoints.save(position.step, result.top1)
    return finish(cfg, ctx, run_dir, writer, recipe, position, stats, result, totals.sums, checkpoints.best_top1)


@dataclass
class EpochStats:
    step: int
    loss: float
    images: int  # over all ranks
    seconds: float
    data_wait: float  # fraction of step time spent waiting for the next batch (mean over ranks)
    skipped: int  # unreadable samples, over all ranks
    stopped: bool  # a rank was asked to stop (SIGTERM/SIGUSR1): every rank left the epoch after this step


class Meter:
    """Sums of a few named figures on this rank since the last `reset`; `reduce` adds them up over all ranks
    in one all-reduce. A tensor (the loss) is summed where it lives: no wait for the GPU on every step."""

    def __init__(self, *names: str):
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.names, 0.0)
        self.started = time.perf_counter()

    def add(self, **values) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + (value.double() if torch.is_tensor(value) else value)

    def reduce(self, device: torch.device) -> dict[str, float]:
        mine = torch.stack([torch.as_tensor(self.sums[n], dtype=torch.float64, device=device) for n in self.names])
        return dict(zip(self.names, dist.all_reduce_sum(mine).tolist()))


@dataclass
class StepLog:
    """Training scalars in TensorBoard every `every` optimizer steps, summed over all ranks."""

    writer: object  # a SummaryWriter on rank 0, a NullWriter elsewhere
    every: int
    first_batch: bool = True  # the run's first batch: its wait (starting the workers) is startup, not data wait

    def write(self, step: int, window: Meter, lr: float, device: torch.device) -> None:
        elapsed, sums = time.perf_counter() - window.started, window.reduce(device)
        self.writer.add_scalar("train/loss", sums["loss"] / sums["images"], step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_s", sums["images"] / elapsed, step)
        self.writer.add_scalar("train/data_wait_frac", sums["wait"] / dist.world_size() / elapsed, step)
        self.writer.add_scalar("data/skipped_samples", sums["skipped"], step)
        window.reset()


def timed(batches: Iterable[Batch]) -> Iterator[tuple[Batch, float]]:
    """Each batch, with the seconds spent waiting for it."""
    batches = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        yield batch, time.perf_counter() - start


def relay_warnings(batch: Batch) -> None:
    """What the data-loader workers logged: to this rank's log (rank 0: the console and train.log)."""
    for message in batch.warnings:
        log.warning("%s", message)


def train_one_epoch(recipe: StepRecipe, batches: Iterable[Batch], position: Position, log_steps: StepLog,
                    after_step: Callable[[Position], bool]) -> EpochStats:
    """One epoch (or the rest of one) of DDP training, advancing `position` (its step and the steps of the
    epoch done: what a mid-epoch checkpoint records). Each batch is one optimizer step (`StepRecipe.step`): a
    batch from each of this rank's micro-batches of the global batch (`Batch.sizes`; recog.data.plan). `after_step`
    decides checkpoints and stops (True: leave the epoch now; every rank gets the same answer)."""
    stopped = False
    recipe.trained.train()
    window, epoch = Meter("loss", "images", "skipped", "wait"), Meter("loss", "images", "skipped", "wait")
    for batch, waited in timed(batches):
        relay_warnings(batch)
        if log_steps.first_batch:
            log_steps.writer.add_scalar("train/startup_s", waited, position.step)
            log_steps.first_batch, waited = False, 0.0
            window.reset(), epoch.reset()
        loss, lr = recipe.step(batch)
        position.advance(batch.step)
        for meter in (window, epoch):
            meter.add(loss=loss, images=len(batch.labels), skipped=batch.skipped, wait=waited)
        if position.step % log_steps.every == 0:  # every rank reaches this at the same step: cannot hang
            log_steps.write(position.step, window, lr, recipe.device)
        if after_step(position):
            stopped = True
            break
    seconds = dist.all_reduce_max(torch.tensor([time.perf_counter() - epoch.started], device=recipe.device)).item()
    sums = epoch.reduce(recipe.device)
    return EpochStats(position.step, sums["loss"] / max(sums["images"], 1), int(sums["images"]), seconds,
                      sums["wait"] / dist.world_size() / max(seconds, 1e-9), int(sums["skipped"]), stopped)


@dataclass
class Evaluation:
    top1: float
    seen: int  # test samples evaluated, over all ranks: each exactly once
    retrieval: dict[str, float]  # recall@1/5/10 and map@r, when asked for
    embeddings: torch.Tensor | None = None  # this rank's, for the projector
    labels: torch.Tensor | None = None
    images: torch.Tensor | None = None  # this rank's first images, uint8, for the projector's thumbnails
    top1_ema: float | None = None  # the weights' moving average's (ema.decay > 0)


@torch.no_grad()
def evaluate(model, loader, normalize, ctx: dist.Dist, retrieval: bool = False, keep_images: int = 0,
             gallery_loader=None, classifier: ShardedClassifier | None = None) -> Evaluation:
    """Top-1 over the test split, and optionally retrieval metrics: each test image queried against the
    others, or against `gallery_loader`'s images (eval.gallery). Each rank holds a disjoint slice of the test
    images (no padding), so every one counts exactly once; for retrieval, each rank searches only its own
    slice against the whole gallery, and the per-query sums are added up over the ranks. `classifier`: a sharded
    classifier's rows (the model has none), whose top-1 every rank computes together once its images are embedded
    (the ranks hold different numbers of them)."""
    model.eval()
    counts = torch.zeros(2, device=ctx.device, dtype=torch.int64)  # [correct, seen]
    embeddings, labels_seen, images = [], [], []
    for batch, labels, out in forward(model, loader, normalize, ctx.device):
        if classifier is None:
            correct = (out.logits.argmax(dim=1) == labels).sum()
            counts += torch.stack([correct, torch.tensor(len(labels), device=ctx.device)])
        if retrieval or classifier is not None:
            embeddings.append(out.embeddings)
            labels_seen.append(labels)
        if retrieval and sum(len(x) for x in images) < keep_images:
            images.append(batch.images)
    if retrieval and gallery_loader is not None:
        gallery_parts = [(out.embeddings, labels) for _, labels, out in forward(model, gallery_loader, normalize,
                                                                                ctx.device)]
    model.train()
    if classifier is not None:
        dim = classifier.weight.shape[1]
        mine = torch.cat(embeddings) if embeddings else torch.zeros(0, dim, device=ctx.device)
        labels_mine = torch.cat(labels_seen) if labels_seen else torch.zeros(0, dtype=torch.int64, device=ctx.device)
        predicted = top1_in_rounds(classifier, mine)
        counts = torch.stack([(predicted == labels_mine).sum(), torch.tensor(len(labels_mine), device=ctx.device)])
    correct, seen = dist.all_reduce_sum(counts).tolist()
    result = Evaluation(correct / max(seen, 1), seen, {})
    if retrieval:
        result.embeddings, result.labels = torch.cat(embeddings), torch.cat(labels_seen)
        result.images = torch.cat(images)[:keep_images] if images else None
        if gallery_loader is None:  # leave-one-out: the gallery is the whole test split, in rank order
            gallery, offset = dist.all_gather_rows(result.embeddings)
            gallery_labels = dist.all_gather_uneven(result.labels)
        else:
            offset = None
            gallery = dist.all_gather_uneven(torch.cat([e for e, _ in gallery_parts]))
            gallery_labels = dist.all_gather_uneven(torch.cat([lab for _, lab in gallery_parts]))
        sums = retrieval_sums(result.embeddings, result.labels, gallery, gallery_labels, query_offset=offset)
        sums = dist.all_reduce_sum(sums)
        result.retrieval = metrics_from_sums(sums)
        if undefined(sums) and ctx.is_main:
            log.warning("%s; they are NaN", undefined(sums))
    return result


def with_ema(result: Evaluation, recipe: StepRecipe, loader, ctx: dist.Dist) -> Evaluation:
    """`result` with the top-1 of the weights' moving average (ema.decay > 0: recog/ema.py) beside the raw weights',
    evaluated as they are, with rank 0's BatchNorm statistics on every rank."""
    if recipe.ema is not None:
        dist.broadcast_buffers(recipe.ema.module)
        result.top1_ema = evaluate(recipe.ema.module, loader, recipe.normalize, ctx).top1
    return result


def forward(model, loader, normalize, device: torch.device) -> Iterator[tuple[Batch, torch.Tensor, Output]]:
    """Each batch of an evaluation loader, its labels and the model's output (batches left empty by unreadable
    samples, counted by the loader, are passed over)."""
    for batch in loader:
        relay_warnings(batch)
        if len(batch.labels) == 0:
            continue
        yield batch, batch.labels.to(device, non_blocking=True), model(normalize(batch.images.to(device,
                                                                                                non_blocking=True)))


def preempted(checkpoints: Checkpoints, position: Position, signal_name: str | None, writer) -> Preempted:
    """Every rank stopped after the same step: rank 0 writes a checkpoint of this point, then all leave."""
    path = checkpoints.save(position.step) or checkpoints.folder / f"step-{position.step:09d}.pt"
    dist.control_barrier()  # no rank exits (which makes torchrun stop the others) before it is written
    writer.close()
    who = signal_name or "another rank's signal"
    return Preempted(f"stopped on {who} at step {position.step}; "
                     f"checkpoint {path} written: run the same command again (same run directory) to continue",
                     signal_name)


def report_epoch(writer, epochs: int, position: Position, stats: EpochStats, result: Evaluation,
                 classes: list[str]) -> None:
    """The epoch's line in the log, its scalars in TensorBoard, and (last epoch, retrieval) the projector."""
    retrieval = result.retrieval
    log.info("epoch %d/%d | loss %.4f | top-1 %.4f%s on %d test images%s | %.0f images/s | data wait %.1f%%%s",
             position.epoch, epochs, stats.loss, result.top1,
             f" (EMA {result.top1_ema:.4f})" if result.top1_ema is not None else "", result.seen,
             "".join(f" | {k} {v:.4f}" for k, v in retrieval.items()), stats.images / stats.seconds,
             100 * stats.data_wait, f" | skipped {stats.skipped} unreadable samples" if stats.skipped else "")
    step = position.step
    writer.add_scalar("eval/top1", result.top1, step)
    if result.top1_ema is not None:
        writer.add_scalar("eval/top1_ema", result.top1_ema, step)
    for name, value in retrieval.items():
        writer.add_scalar(f"eval/{name}", value, step)
    if result.images is not None:  # TensorBoard's projector: a sample of the test embeddings, with thumbnails
        n = len(result.images)
        writer.add_embedding(result.embeddings[:n].cpu(), global_step=step, tag="test",
                             metadata=[classes[i] for i in result.labels[:n].tolist()],
                             label_img=result.images.float().div(255).expand(-1, 3, -1, -1))
    writer.add_scalar("train/epoch_loss", stats.loss, step)
    writer.add_scalar("train/epoch_images_per_s", stats.images / stats.seconds, step)
    writer.add_scalar("train/epoch_data_wait_frac", stats.data_wait, step)


def override_hparams() -> dict:
    """The command line's overrides (what a sweep varies), for TensorBoard's hparams dashboard."""
    if not HydraConfig.initialized():
        return {}
    out = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.partition("=")
        try:
            out[key] = float(value) if any(c in value for c in ".e") else int(value)
        except ValueError:
            out[key] = value
    return out


def finish(cfg: DictConfig, ctx: dist.Dist, run_dir: Path, writer, recipe: StepRecipe, position: Position,
           stats: EpochStats | None, result: Evaluation | None, totals: dict, best_top1: float) -> dict:
    """metrics.json and TensorBoard's hparams (rank 0), and the metrics every rank returns."""
    lr, global_batch, top1 = recipe.lr, recipe.global_batch, result.top1 if result else float("nan")
    metrics = {
        "epoch": max(cfg.epochs, position.epoch), "step": position.step, "top1": top1, "best_top1": best_top1,
        "eval_samples": result.seen if result else 0,
        "images_per_s": totals["images"] / totals["seconds"] if totals["seconds"] else 0.0,
        "train_loss": stats.loss if stats else float("nan"),
        "data_wait_frac": stats.data_wait if stats else float("nan"), "skipped_samples": int(totals["skipped"]),
        "world_size": ctx.world_size, "global_batch": global_batch, "lr": lr,
        **(result.retrieval if result else {}),
        **({"top1_ema": result.top1_ema} if result and result.top1_ema is not None else {}),
    }
    if ctx.is_main:
        write_json(metrics, run_dir / "metrics.json")
        hparams = {"model": cfg.model.backbone, "optimizer": cfg.optim.optimizer._target_.rsplit(".", 1)[-1],
                   "lr": lr, "global_batch": global_batch, "epochs": cfg.epochs, "seed": cfg.seed,
                   "world_size": ctx.world_size, "precision": cfg.perf.precision, "accumulate": cfg.accumulate,
                   **override_hparams()}
        writer.add_hparams(hparams, {"hparam/top1": top1, "hparam/images_per_s": metrics["images_per_s"]},
                           run_name=".")
        writer.close()
        log.info("done: top-1 %.4f, %.0f images/s; outputs in %s", top1, metrics["images_per_s"], run_dir)
    return metrics
