"""Embed every sample of a folder of shards, each rank its own slice, into an embeddings folder.

    torchrun --standalone --nproc_per_node=2 -m recog.embed model=EXPORT_DIR_OR_CHECKPOINT data=SHARDS out=DIR
    python -m recog.embed model=... data=... out=...       (one process)

Config: conf/embed.yaml (batch_size, num_workers, dtype, strict, part_size, dist.*). `model` is a folder written
by `python -m recog.export` or a checkpoint written by train.py (its embedder is built as the export builds it).

Each rank embeds its exact, unpadded slice of the shards (the evaluation's split: `rank_pieces`, no
shuffle), cut into parts of `part_size` samples (recog/data/embed_stream.py), and writes each part as soon as
it is complete: `part-RRRRR-NNNNN.npy` and `.npz` (the format of recog/embeddings.py), then its record
`part-RRRRR-NNNNN.json`, each atomically. The record is the part's proof of completion and says what it was
made with (the plan: world size, part size, model, dtype, shards); a run started again with the same plan keeps
the parts that have one and embeds only the others. After every rank is done, rank 0 writes `manifest.json`
listing the parts in the shards' order: its presence means the folder is complete.

SIGTERM, SIGUSR1 or Ctrl-C stop each rank after its current batch (exit code 75, 130 on Ctrl-C); the parts
written so far are kept. Bad input is one sentence and exit code 2, before any rank waits for another.
"""

# Run as a program: catch the stop signals first, before the slow imports (see train.py). Imported (by a test, or
# as a data-loader worker's main module), it leaves the signal handlers alone.
from recog.preempt import StopOnSignal

STOP = StopOnSignal().install() if __name__ == "__main__" else None

import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from recog import dist  # noqa: E402
from recog.data.embed_stream import Part, PartBatch, PartStream, rank_parts  # noqa: E402
from recog.data.loader import make_loader, stop_data_workers  # noqa: E402
from recog.data.manifest import Manifest, item_key, load_manifest  # noqa: E402
from recog.data.plan import rank_pieces  # noqa: E402
from recog.data.source import ShardSource  # noqa: E402
from recog.embeddings import (  # noqa: E402
    DTYPES,
    MANIFEST,
    part_name,
    refuse_foreign_manifest,
    source_of,
    write_manifest,
    write_part,
)
from recog.errors import ConfigError, RecogError, check_number  # noqa: E402
from recog.exported import ExportedEmbedder, Preprocess  # noqa: E402
from recog.files import FolderLock, exclusive, plain_name, write_json  # noqa: E402
from recog.log import setup_logging  # noqa: E402
from recog.preempt import Preempted  # noqa: E402
from recog.rundir import project_dir  # noqa: E402
from recog.shell import leave, run_command  # noqa: E402

log = logging.getLogger("recog")


@dataclass(frozen=True)
class Plan:
    """What decides which samples a part holds and what its vectors are: a restarted run keeps the parts on disk
    only if its plan is the same."""

    world_size: int
    part_size: int
    model_sha256: str  # the checkpoint's sha256 (model.json), as the manifest says
    dtype: str
    data_sha256: str  # of the shards' list in their manifest: names, sample counts, sizes, sha256

    def differences(self, other: dict) -> list[str]:
        return [f"{key} {other.get(key)} (this run: {value})" for key, value in asdict(self).items()
                if other.get(key) != value]


@dataclass
class RankWork:
    """This rank's share, from its inputs: the model, the shards, its parts and which of them are on disk."""

    model: Callable[[torch.Tensor], torch.Tensor]
    info: dict  # model.json's content (an export), or what an export of the checkpoint would write
    manifest: Manifest
    plan: Plan
    stream: PartStream  # the batches of the parts still to embed
    parts: list[Part]  # all of this rank's parts
    records: dict[int, dict]  # part number -> record, for the parts complete on disk
    lock: FolderLock | None  # rank 0's hold on the out folder: one embedding run writes it at a time


def check_embed_config(cfg: DictConfig) -> None:
    """Every configured value, each as one sentence, before any process group exists."""
    for key, example in (("model", "model=/tmp/export"), ("data", "data=data/shards/x/train"),
                         ("out", "out=/tmp/embeddings")):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise ConfigError(f"{key} is not set; give it on the command line, e.g. {example}.")
    for key, whole, least, above in (("batch_size", True, 1, False), ("num_workers", True, 0, False),
                                     ("part_size", True, 1, False), ("dist.timeout_s", False, 0, True)):
        check_number(key, OmegaConf.select(cfg, key), whole, least, above)
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype} is not valid; give {' or '.join(DTYPES)}.")
    if not isinstance(cfg.strict, bool):
        raise ConfigError(f"strict={cfg.strict} is not valid; give true or false.")


def open_model(path: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """An export's program, or a checkpoint's embedder built as recog.export builds it; with model.json's info."""
    from recog.export import Embedder, class_count, describe, read_checkpoint, rebuild_model, training_class_names

    path = Path(path)
    if path.is_dir():
        exported = ExportedEmbedder(path)
        return exported.program, exported.info
    if not path.is_file():
        raise ConfigError(f"model {path} does not exist; give a folder written by python -m recog.export or a "
                          "checkpoint written by train.py.")
    ckpt = read_checkpoint(path, "model=")
    model = rebuild_model(ckpt, path)
    info = describe(ckpt, path, model, training_class_names(ckpt, class_count(ckpt, model))[0])
    return Embedder(model, info["mean"], info["std"]).eval(), info


def data_sha256(manifest: Manifest) -> str:
    shards = [asdict(s) for s in manifest.shards]
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


def record_path(out: Path, rank: int, number: int) -> Path:
    return out / f"{part_name(number, rank)}.json"


def read_records(out: Path, plan: Plan, rank: int, parts: list[Part]) -> dict[int, dict]:
    """This rank's parts complete on disk: a record (written after the part's two files) for the same plan and
    slots, and both files. Any record of another plan is an error: mixing would duplicate or lose samples."""
    refuse_foreign_manifest(out)
    records = {}
    for path in sorted(out.glob("part-*.json")):
        try:
            record = json.loads(path.read_text())
            theirs, their_rank, number = record["plan"], int(record["rank"]), int(record["number"])
            name = record["name"]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ConfigError(f"{path} is not a part record of python -m recog.embed ({e}); remove it, or choose "
                              "another out folder.") from None
        if differences := plan.differences(theirs):
            raise ConfigError(f"{out} holds parts of another embedding run ({', '.join(differences)}); run it "
                              "again with the same settings to continue it, or choose another out folder.")
        if their_rank != rank or number >= len(parts):
            continue
        part = parts[number]
        plain_name(name, path, "remove it, or choose another out folder.")  # a part's files lie in this folder
        if record.get("slots") == [part.start, part.stop] and all(
                (out / f"{name}{ext}").is_file() for ext in (".npy", ".npz")):
            records[number] = record
    if not records and (out / MANIFEST).exists() and not any(out.glob("part-*.json")):
        raise ConfigError(f"{out} already holds embeddings written by another command; choose another out folder.")
    return records


def open_inputs(cfg: DictConfig, ctx: dist.Dist) -> RankWork:
    """Everything this rank needs, checked: the model, the shards, the out folder. Raises one sentence."""
    model, info = open_model(cfg.model)
    source = ShardSource()
    manifest = load_manifest(cfg.data, source)
    channels, measured = info["input"]["channels"], manifest.stats.get("channels")
    if measured is not None and measured != channels:
        grey = {1: "grey", 3: "colour"}
        raise ConfigError(f"the model takes {grey.get(channels, channels)} images ({channels} channel(s)) but the "
                          f"shards of {cfg.data} are {grey.get(measured, measured)} ({measured} channel(s)); embed "
                          "them with a model trained on such images.")
    plan = Plan(ctx.world_size, cfg.part_size, info["checkpoint"]["sha256"], cfg.dtype, data_sha256(manifest))
    pieces = rank_pieces(manifest.shard_sizes, ctx.rank, ctx.world_size, shuffle=False)
    parts = rank_parts(sum(len(p) for p in pieces), cfg.part_size)
    out = Path(cfg.out)
    records = read_records(out, plan, ctx.rank, parts)
    lock = exclusive(out, "embedding run") if ctx.is_main else None  # read first: a file for out is one sentence
    todo = [p for p in parts if p.number not in records]
    stream = PartStream(manifest, pieces, todo, batch_size=cfg.batch_size, preprocess=Preprocess.of(info),
                        channels=channels, strict=cfg.strict, source=source)
    return RankWork(model, info, manifest, plan, stream, parts, records, lock)


class RankParts:
    """Collects a part's vectors, keys and labels batch by batch and, at its last batch, writes the part: its two
    files, then its record. The writing happens in a thread, so that the model calls go on meanwhile (a part's
    copy off the GPU, its float16 conversion and three fsyncs); at most `ahead` parts wait to be written."""

    def __init__(self, out: Path, rank: int, work: RankWork, ahead: int = 2):
        self.out, self.rank, self.plan, self.identity = out, rank, work.plan, work.manifest.identity
        self.parts, self.dim, self.ahead = work.parts, work.info["embedding_dim"], ahead
        self.pending: dict[int, list[tuple[PartBatch, torch.Tensor | None]]] = {}
        self.records = dict(work.records)  # part number -> record: complete on disk, or written by this run
        self.writer, self.writing = ThreadPoolExecutor(1, thread_name_prefix="recog-parts"), deque()

    def add(self, batch: PartBatch, vectors: torch.Tensor | None) -> None:
        self.pending.setdefault(batch.part, []).append((batch._replace(images=None), vectors))
        if batch.last:
            while len(self.writing) >= self.ahead or (self.writing and self.writing[0].done()):
                self.writing.popleft().result()  # raises the writer's error here
            self.writing.append(self.writer.submit(self.write, batch.part, self.pending.pop(batch.part)))

    def finish(self) -> int:
        """Wait until every complete part is written (also when stopping: they are kept); returns how many parts
        are on disk. Parts still collecting batches are dropped: a restarted run embeds them again."""
        try:
            while self.writing:
                self.writing.popleft().result()
        finally:
            self.writer.shutdown(wait=True)
        return len(self.records)

    @torch.inference_mode()
    def write(self, number: int, batches: list[tuple[PartBatch, torch.Tensor | None]]) -> None:
        found = [v for _, v in batches if v is not None]
        # one copy off the device per part, not per batch: the model calls are not held up waiting for it
        vectors = torch.cat(found).float().cpu().numpy() if found else np.zeros((0, self.dim), np.float32)
        keys = np.asarray([item_key(self.identity, key) for b, _ in batches for key in b.keys.tolist()], dtype=str)
        labels = torch.cat([b.labels for b, _ in batches]).numpy()
        name, part = part_name(number, self.rank), self.parts[number]
        record = {"name": name, "count": len(keys), "skipped": sum(b.skipped for b, _ in batches),
                  "rank": self.rank, "number": number, "slots": [part.start, part.stop], "plan": asdict(self.plan)}
        try:
            write_part(self.out, name, vectors.astype(self.plan.dtype), keys, labels)
            write_json(record, record_path(self.out, self.rank, number))  # last: the part is complete
        except OSError as e:  # a full disk, a quota: nothing half-written is left, the parts written are kept
            raise RecogError(f"writing part {name} into {self.out} failed ({e.strerror or e}); free space there and "
                             "run the same command again: it keeps the parts already written.") from None
        self.records[number] = record

    def listed(self) -> list[dict]:
        """Every part of this rank in order, for the manifest (all are complete once the loop ran through)."""
        return [{"name": r["name"], "count": r["count"], "skipped": r["skipped"]}
                for _, r in sorted(self.records.items())]


def embed_batches(model, batches, parts: RankParts, device: torch.device, stop: StopOnSignal,
                  progress) -> tuple[int, float | None]:
    """The loop: each batch through the model, each part written when complete. Reading, decoding and resizing
    happen in the data-loader workers; here, only the model call and the bookkeeping of a few objects per batch.
    Returns the images embedded and when the first batch arrived (the wait before it is the workers' start)."""
    images, first = 0, None
    with torch.inference_mode():
        for batch in batches:
            if first is None:
                first = time.perf_counter()
            if stop.caught:
                break
            for message in batch.warnings:  # what the data-loader workers logged (a skipped sample)
                log.warning("%s", message)
            n = len(batch.keys)
            parts.add(batch, model(batch.images.to(device, non_blocking=True)) if n else None)
            images += n
            progress.update(n + batch.skipped)
    return images, first


def embed(cfg: DictConfig, stop: StopOnSignal) -> dict:
    """Every rank: check, set up, embed its parts, then rank 0 writes the manifest. Returns the manifest's
    figures and the throughput."""
    check_embed_config(cfg)
    if stop.caught:  # torchrun stops every rank when one fails: it failed before this one started
        raise Preempted("stopped before embedding started (when one rank fails, torchrun stops the others: see "
                        "its error above)", stop.caught)
    ctx = dist.setup(cfg.dist.backend, cfg.dist.timeout_s)
    try:
        with dist.collective_failures(ctx, cfg.dist.timeout_s, stop):
            return embed_on_rank(cfg, ctx, stop)
    finally:
        dist.teardown()


def embed_on_rank(cfg: DictConfig, ctx: dist.Dist, stop: StopOnSignal) -> dict:
    setup_logging(None, ctx.is_main)
    # every rank opens its inputs; a problem on any rank is one sentence on all of them, before any other collective
    work = dist.fail_together(lambda: open_inputs(cfg, ctx), ctx, "opening the model and the shards")
    out, info = Path(cfg.out), work.info
    todo = work.stream.parts
    counts = dist.all_gather_object((len(work.parts), len(todo)))
    if ctx.is_main:
        total, left = sum(c[0] for c in counts), sum(c[1] for c in counts)
        log.info("embedding %d samples of %s with %s (%d-d, %s) on %d process(es) into %s: %d parts of up to %d "
                 "samples, %d written already", work.manifest.num_samples, cfg.data, cfg.model,
                 info["embedding_dim"], cfg.dtype, ctx.world_size, out, total, cfg.part_size, total - left)
        if left:
            (out / MANIFEST).unlink(missing_ok=True)  # parts are missing: the folder is incomplete until the end
    out.mkdir(parents=True, exist_ok=True)

    model = work.model.to(ctx.device)
    parts = RankParts(out, ctx.rank, work)
    batches = make_loader(work.stream, cfg.num_workers if todo else 0, ctx.device.type == "cuda")
    progress = tqdm(total=sum(p.stop - p.start for p in todo), unit="img", desc="rank 0", file=sys.stderr,
                    disable=not (ctx.is_main and todo), mininterval=2, smoothing=0.1)
    started = time.perf_counter()
    try:
        images, first = embed_batches(model, batches, parts, ctx.device, stop, progress)
    finally:
        progress.close()
        written = parts.finish()
    first = first or time.perf_counter()
    startup, seconds = first - started, time.perf_counter() - first
    if stop.caught:
        raise Preempted(f"rank {ctx.rank} stopped on {stop.caught} with {written} of its "
                        f"{len(work.parts)} parts written in {out}; run the same command again to continue",
                        stop.caught)

    if written != len(work.parts):  # a programming error: every part must be complete here
        raise RuntimeError(f"rank {ctx.rank}: {written} of {len(work.parts)} parts written")
    return finish(cfg, ctx, work, parts.listed(), {"images": images, "seconds": seconds, "startup": startup})


def finish(cfg: DictConfig, ctx: dist.Dist, work: RankWork, mine: list[dict], timing: dict) -> dict:
    """Every rank is done: rank 0 writes the manifest, listing every rank's parts in rank order (the shards'
    order). Returns its figures and the throughput, the same on every rank."""
    out, info = Path(cfg.out), work.info
    everyone = dist.all_gather_object({"parts": mine, **timing})
    listed = [p for rank in everyone for p in rank["parts"]]
    skipped = sum(p["skipped"] for p in listed)
    parts_listed = [{"name": p["name"], "count": p["count"]} for p in listed if p["count"]]
    if ctx.is_main:
        write_manifest(out, work.plan.model_sha256, info["embedding_dim"], cfg.dtype, parts_listed,
                       work.manifest.classes, [source_of(work.manifest, cfg.data)], world_size=ctx.world_size,
                       part_size=cfg.part_size, skipped=skipped)
    embedded, slowest = sum(r["images"] for r in everyone), max(r["seconds"] for r in everyone)
    result = {"count": sum(p["count"] for p in parts_listed), "parts": len(parts_listed), "skipped": skipped,
              "images": embedded, "seconds": slowest, "images_per_s": embedded / slowest if slowest else 0.0,
              "startup_s": max(r["startup"] for r in everyone)}
    if ctx.is_main:
        now = (f"{embedded} embedded now in {slowest:.1f} s ({result['images_per_s']:.0f} images/s, after "
               f"{result['startup_s']:.1f} s for the data-loader workers to start)" if embedded else
               "nothing left to embed")
        log.info("%s: %d %d-d %s embeddings in %d parts%s; %s", out, result["count"], info["embedding_dim"], cfg.dtype,
                 result["parts"], f", {skipped} unreadable samples skipped" if skipped else "", now)
    return result


def run(cfg: DictConfig, stop: StopOnSignal) -> dict:
    try:
        return embed(cfg, stop)
    except BaseException:
        stop_data_workers()  # they ignore the stop signals: Python's exit would wait for them forever
        raise


def register_config() -> None:
    """conf/embed.yaml, as the primary config of a search path of its own: in conf/, `model=` and `data=` would
    name train.py's config groups of those names rather than set this command's values."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="embed", node=OmegaConf.load(Path(project_dir()) / "conf" / "embed.yaml"))


@hydra.main(version_base="1.3", config_path=None, config_name="embed")
def main(cfg: DictConfig) -> None:
    def work() -> None:
        run(cfg, STOP or StopOnSignal().install())

    leave(run_command(work))


if __name__ == "__main__":
    dist.adopt_slurm_env()
    register_config()
    main()
