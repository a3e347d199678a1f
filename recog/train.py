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
from dataclasses import dataclass, field
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
from recog.eval_figures import Tally, report_evaluation, say_once
from recog.files import write_json
from recog.log import make_writer, setup_logging, write_model_json
from recog.mlflow_log import check_logger
from recog.model import Output
from recog.preempt import Preempted, StopOnSignal
from recog.progress import NoProgress, Progress, make_progress
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
        check_logger(cfg)  # logger=mlflow: installed, and its tracking server answers
        if stop.caught:  # torchrun stops every rank when one fails: it failed before this one started
            raise Preempted("stopped before training started (when one rank fails, torchrun stops the others: "
                            "see its error above)", stop.caught)
        ctx = dist.setup(cfg.dist.backend, cfg.dist.timeout_s)
        stop.flag = dist.AnyRankFlag(cfg.dist.stop_check_s)  # from here on the ranks agree on when to stop (and save)
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
    recipe = build_recipe(cfg, ctx, data, position, resuming=found is not None)  # LR schedule follows the position
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
        # ~1/s, read a step later (AnyRankFlag): a rank caught a stop signal; rank 0's clock says a checkpoint is due
        stop_now, minutes_up = stop.agreed_with(checkpoints.minutes_up())
        if stop_now:
            return True
        if not position.epoch_done:  # an epoch's last step: its end-of-epoch checkpoint follows
            checkpoints.save_if_due(position.step, minutes_up)
        return False

    writer = make_writer(run_dir, ctx.is_main, resumed_at=position.step if checkpoints.resumed_from else None,
                         logger=cfg.logger, config=checkpoints.config)  # TensorBoard, + MLflow (logger=mlflow)
    log_steps = StepLog(writer, cfg.log_every, make_progress(ctx.is_main, cfg.epochs),
                        MidEpochEvaluation(cfg.eval, recipe, data, ctx, classifier, writer))  # eval.every_steps
    totals, stats, result = Meter("images", "seconds", "skipped"), None, None
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
        result = with_ema(evaluate_test(recipe.model, recipe, data, ctx, cfg.eval, classifier,
                                        keep_images=cfg.eval.projector if position.epoch == cfg.epochs else 0),
                          recipe, data.test_loader, ctx)
        report_epoch(writer, cfg.epochs, position, stats, result, data.classes, cfg.eval)
        checkpoints.save(position.step, result.top1)
    return finish(cfg, ctx, run_dir, writer, recipe, position, stats, result, totals.sums, checkpoints)


def evaluate_test(model, recipe: StepRecipe, data, ctx: dist.Dist, eval_cfg: DictConfig,
                  classifier: ShardedClassifier | None, keep_images: int = 0) -> Evaluation:
    """`model` (the trained one, or another of the same data: an average of its weights) on the test split, with
    the figures eval_cfg asks for."""
    return evaluate(model, data.test_loader, recipe.normalize, ctx, retrieval=eval_cfg.retrieval,
                    keep_images=keep_images, gallery_loader=data.gallery_loader, classifier=classifier,
                    num_classes=len(data.classes), confusion_classes=eval_cfg.confusion_classes)


@dataclass
class MidEpochEvaluation:
    """eval.every_steps: an evaluation between two steps of an epoch, on every rank at the same step, that leaves
    training as it was: the random generators restored (the training run's draws are those of a run without it)
    and each module back in its own mode. Called after each step: the seconds it took (0: none was due)."""

    eval_cfg: DictConfig
    recipe: StepRecipe
    data: object  # recog.build.TrainData
    ctx: dist.Dist
    classifier: ShardedClassifier | None
    writer: object

    def __call__(self, position: Position) -> float:
        every = self.eval_cfg.every_steps
        if not every or position.step % every or position.epoch_done:  # the epoch's end evaluates anyway
            return 0.0
        started, recipe = time.perf_counter(), self.recipe
        modes = {module: module.training for module in recipe.trained.modules()}
        with torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.device.type == "cuda" else []):
            dist.broadcast_buffers(recipe.model)  # rank 0's BatchNorm statistics (DDP sends them each step anyway)
            result = evaluate_test(recipe.model, recipe, self.data, self.ctx, self.eval_cfg, self.classifier)
        for module, training in modes.items():
            module.train(training)
        log.info("step %d (epoch %d, %d/%d) | top-1 %.4f%s on %d test images%s", position.step, position.epoch + 1,
                 position.steps_done, position.batches_per_epoch, result.top1, top5_text(result), result.seen,
                 "".join(f" | {k} {v:.4f}" for k, v in result.retrieval.items()))
        report_worst(report_evaluation(self.writer, result, position.step, self.data.classes,
                                       **figures_settings(self.eval_cfg)))
        return time.perf_counter() - started


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
        self.count = 0  # `add` calls since: steps, for a meter added to at each step

    def pause(self, seconds: float) -> None:
        """Leave these seconds (an evaluation between steps) out of the time since the reset."""
        self.started += seconds

    def add(self, **values) -> None:
        self.count += 1
        for name, value in values.items():
            self.sums[name] = self.sums[name] + (value.double() if torch.is_tensor(value) else value)

    def reduce(self, device: torch.device) -> dict[str, float]:
        mine = torch.stack([torch.as_tensor(self.sums[n], dtype=torch.float64, device=device) for n in self.names])
        return dict(zip(self.names, dist.all_reduce_sum(mine).tolist()))


@dataclass
class StepLog:
    """Training scalars in TensorBoard, and rank 0's progress line, every `every` optimizer steps, summed over
    all ranks; `evaluate`, called after each step, evaluates when due (eval.every_steps) and returns the seconds it
    took, which the figures leave out."""

    writer: object  # a SummaryWriter on rank 0, a NullWriter elsewhere
    every: int
    progress: Progress | NoProgress = field(default_factory=NoProgress)  # rank 0's line: recog/progress.py
    evaluate: Callable[[Position], float] | None = None  # MidEpochEvaluation
    first_batch: bool = True  # the run's first batch: its wait (starting the workers) is startup, not data wait

    def write(self, position: Position, window: Meter, lr: float, device: torch.device) -> None:
        step, elapsed, sums = position.step, time.perf_counter() - window.started, window.reduce(device)
        loss, images_per_s = sums["loss"] / sums["images"], sums["images"] / elapsed
        data_wait = sums["wait"] / dist.world_size() / elapsed
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_s", images_per_s, step)
        self.writer.add_scalar("train/data_wait_frac", data_wait, step)
        self.writer.add_scalar("data/skipped_samples", sums["skipped"], step)
        self.progress.update(position, window.count, elapsed, loss, images_per_s, data_wait)
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
    decides checkpoints and stops (True: leave the epoch now; every rank gets the same answer); then `log_steps`
    evaluates, when due (eval.every_steps)."""
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
            log_steps.write(position, window, lr, recipe.device)
        if after_step(position):
            stopped = True
            break
        if log_steps.evaluate is not None:  # every rank, at the same step
            paused = log_steps.evaluate(position)
            window.pause(paused), epoch.pause(paused)
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
    top5: float | None = None  # None with a sharded classifier (its rounds find the top class only)
    class_correct: torch.Tensor | None = None  # per class, over all ranks (with num_classes)
    class_seen: torch.Tensor | None = None
    confusion: torch.Tensor | None = None  # [true class, predicted class] counts, up to confusion_classes classes
    top1_ema: float | None = None  # the weights' moving average's (ema.decay > 0)


@torch.no_grad()
def evaluate(model, loader, normalize, ctx: dist.Dist, retrieval: bool = False, keep_images: int = 0,
             gallery_loader=None, classifier: ShardedClassifier | None = None, num_classes: int = 0,
             confusion_classes: int = 100) -> Evaluation:
    """Top-1 over the test split, and optionally retrieval metrics: each test image queried against the
    others, or against `gallery_loader`'s images (eval.gallery). Each rank holds a disjoint slice of the test
    images (no padding), so every one counts exactly once; for retrieval, each rank searches only its own
    slice against the whole gallery, and the per-query sums are added up over the ranks. `classifier`: a sharded
    classifier's rows (the model has none), whose top-1 every rank computes together once its images are embedded
    (the ranks hold different numbers of them). `num_classes`: also top-1 per class and, up to `confusion_classes`
    classes, the confusion matrix (0: neither)."""
    model.eval()
    tally = Tally(ctx.device, num_classes, confusion_classes, top5=classifier is None)
    embeddings, labels_seen, images = [], [], []
    for batch, labels, out in forward(model, loader, normalize, ctx.device):
        if classifier is None:
            tally.add(labels, out.logits.argmax(dim=1), out.logits.topk(min(5, out.logits.shape[1]), dim=1).indices)
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
        tally.add(labels_mine, top1_in_rounds(classifier, mine))
        say_once("top-5 is not computed with model.classifier=sharded (its rounds find each image's top class only)")
    result = Evaluation(retrieval={}, **tally.reduce())
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
                 classes: list[str], eval_cfg: DictConfig | None = None) -> None:
    """The epoch's line in the log, its scalars in TensorBoard, and (last epoch, retrieval) the projector."""
    retrieval = result.retrieval
    log.info("epoch %d/%d | loss %.4f | top-1 %.4f%s%s on %d test images%s | %.0f images/s | data wait %.1f%%%s",
             position.epoch, epochs, stats.loss, result.top1,
             f" (EMA {result.top1_ema:.4f})" if result.top1_ema is not None else "", top5_text(result), result.seen,
             "".join(f" | {k} {v:.4f}" for k, v in retrieval.items()), stats.images / stats.seconds,
             100 * stats.data_wait, f" | skipped {stats.skipped} unreadable samples" if stats.skipped else "")
    step = position.step
    if result.top1_ema is not None:
        writer.add_scalar("eval/top1_ema", result.top1_ema, step)
    report_worst(report_evaluation(writer, result, step, classes, **figures_settings(eval_cfg)))
    if result.images is not None:  # TensorBoard's projector: a sample of the test embeddings, with thumbnails
        n = len(result.images)
        writer.add_embedding(result.embeddings[:n].cpu(), global_step=step, tag="test",
                             metadata=[classes[i] for i in result.labels[:n].tolist()],
                             label_img=result.images.float().div(255).expand(-1, 3, -1, -1))
    writer.add_scalar("train/epoch_loss", stats.loss, step)
    writer.add_scalar("train/epoch_images_per_s", stats.images / stats.seconds, step)
    writer.add_scalar("train/epoch_data_wait_frac", stats.data_wait, step)


def top5_text(result: Evaluation) -> str:
    return f" | top-5 {result.top5:.4f}" if result.top5 is not None else ""


def figures_settings(eval_cfg: DictConfig | None) -> dict:
    """report_evaluation's settings from the eval config (its defaults without one)."""
    if eval_cfg is None:
        return {}
    return {"per_class_scalars": eval_cfg.per_class_scalars, "worst": eval_cfg.worst_classes}


def report_worst(worst: str) -> None:
    if worst:
        log.info("worst classes (top-1, test images): %s", worst)


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
           stats: EpochStats | None, result: Evaluation | None, totals: dict, checkpoints: Checkpoints) -> dict:
    """metrics.json, model.json and TensorBoard's hparams (rank 0; both files to MLflow with logger=mlflow), and
    the metrics every rank returns."""
    lr, global_batch, top1 = recipe.lr, recipe.global_batch, result.top1 if result else float("nan")
    best_top1 = checkpoints.best_top1
    metrics = {
        "epoch": max(cfg.epochs, position.epoch), "step": position.step, "top1": top1, "best_top1": best_top1,
        "top5": result.top5 if result else None,  # None: a sharded classifier (top-1 only)
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
        write_model_json(run_dir, cfg.model.backbone, recipe.model, checkpoints.classes, top1, best_top1)
        writer.log_artifacts([run_dir / "metrics.json", run_dir / "model.json"])
        hparams = {"model": cfg.model.backbone, "optimizer": cfg.optim.optimizer._target_.rsplit(".", 1)[-1],
                   "lr": lr, "global_batch": global_batch, "epochs": cfg.epochs, "seed": cfg.seed,
                   "world_size": ctx.world_size, "precision": cfg.perf.precision, "accumulate": cfg.accumulate,
                   **override_hparams()}
        writer.add_hparams(hparams, {"hparam/top1": top1, "hparam/images_per_s": metrics["images_per_s"]},
                           run_name=".")
        writer.close()
        log.info("done: top-1 %.4f, %.0f images/s; outputs in %s", top1, metrics["images_per_s"], run_dir)
    return metrics
