"""Communication benchmark: all-reduce bandwidth, and the gradient bytes of a DDP step under comm hooks.

    torchrun --standalone --nproc_per_node=2 bench/comm.py     # 2 processes: gloo on CPU, NCCL on GPU
    torchrun --standalone --nproc_per_node=2 bench/comm.py --sizes-mb 1 8 --model resnet18 --steps 8
    python bench/comm.py                                        # 1 process (a process group of one)

Backend: NCCL with tensors on cuda:LOCAL_RANK if torch.cuda.is_available(), else gloo on CPU.
Only rank 0 prints. MB = 1e6 bytes, GB/s = 1e9 bytes/s.

Table 1, all-reduce bandwidth: per float32 message size (--sizes-mb), 2 warm-up all-reduces, then
--iters timed ones, each started together (a 1-element all-reduce first; on CUDA, synchronized
before and after). A call's time is the slowest rank's; the table shows the median.
algbw = bytes / time; busbw = algbw * 2(n-1)/n, the nccl-tests convention for all-reduce: a ring
all-reduce moves 2(n-1)/n of the message over each rank's link, so busbw compares with the link's
bandwidth whatever n is. With one process nothing crosses a link: busbw is 0.

Table 2, gradient bytes per training step: torchvision's resnet50 or resnet18 (--model; weights=None,
num_classes=10) under DDP, synthetic batches of --batch-size 3x--image-size^2 images per rank, SGD,
cross-entropy, --steps steps per case, each case a fresh model with the same initial weights:
  allreduce        default_hooks.allreduce_hook: what DDP does without a hook (bucket.buffer() / world
                   size, all-reduced), but from Python, so counted like the others (DDP's own C++
                   all-reduce never passes through torch.distributed's Python functions)
  fp16 / bf16      default_hooks.fp16_compress_hook / bf16_compress_hook
  powerSGD r=1, 4  powerSGD_hook.powerSGD_hook, PowerSGDState(matrix_approximation_rank=r, start_powerSGD_iter=2)
These hooks call torch.distributed.all_reduce, looked up on the module at call time. During the
steps it (and all_gather, all_gather_into_tensor, should a hook use them) is replaced by a wrapper
that adds up numel * element_size of the tensor handed to it, then calls the real collective. Bytes
are per rank, of the last step (PowerSGD all-reduces uncompressed before start_powerSGD_iter); the
allreduce row must equal "grads" in the title (sum of parameter numel * element_size). A hook whose
real DDP step raises (e.g. a dtype the backend lacks) gets "not supported on <backend>: <reason>".
PowerSGD on gloo: its 2nd and 3rd all-reduce per bucket are issued from callbacks on gloo's worker
thread, so they interleave with the next bucket's all-reduce in a different order on each rank: a
collective mismatch that aborts the process (gloo::EnforceNotMet, not catchable). On gloo the hook
therefore waits for each bucket's future before returning (recog.parallel.one_bucket_at_a_time, which
training on gloo uses too; same bytes, no overlap): "yes (serialized)".
Step time: median of the steps after the first 3 (bucket rebuild, PowerSGD's start); CPU-noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from _common import header, row, sync
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from recog.parallel import one_bucket_at_a_time

MB = 1e6
WARM_STEPS = 3  # steps left out of the step time; PowerSGD compresses from step index 2 on
COUNTED = {"all_reduce": (0, "tensor"), "all_gather": (1, "tensor"),
           "all_gather_into_tensor": (1, "input_tensor")}  # function: where its input tensor is


def setup() -> torch.device:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:  # started by torchrun: env:// rendezvous
        dist.init_process_group(backend)
    else:  # a plain `python bench/comm.py`: a group of one on an in-memory store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def start_together(device: torch.device) -> None:
    dist.all_reduce(torch.zeros(1, device=device))
    sync(device)


def slowest_median(times: list[float], device: torch.device) -> float:
    """Median over calls of the slowest rank's time (a collective lasts until its last rank is done)."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist())


def bandwidth(sizes_mb: list[float], iters: int, device: torch.device) -> list[tuple]:
    n = dist.get_world_size()
    rows = []
    for size in sizes_mb:
        x = torch.ones(int(size * MB) // 4, dtype=torch.float32, device=device)
        nbytes = x.numel() * x.element_size()
        times = []
        for _ in range(2 + iters):
            start_together(device)
            t0 = time.perf_counter()
            dist.all_reduce(x)
            sync(device)
            times.append(time.perf_counter() - t0)
        sec = slowest_median(times[2:], device)
        algbw = nbytes / sec / 1e9
        rows.append((nbytes / MB, sec * 1e3, algbw, algbw * 2 * (n - 1) / n))
    return rows


@contextmanager
def counting_collectives(counts: dict[str, list[int]]):
    """Wrap torch.distributed's collectives so that each call adds [1, bytes of its input] to counts[name]."""
    lock = threading.Lock()  # PowerSGD's later all-reduces run in future callbacks, maybe on another thread

    def wrap(name, real):
        index, key = COUNTED[name]

        def counted(*args, **kwargs):
            t = args[index] if len(args) > index else kwargs[key]
            with lock:
                calls_bytes = counts.setdefault(name, [0, 0])
                calls_bytes[0] += 1
                calls_bytes[1] += t.numel() * t.element_size()
            return real(*args, **kwargs)  # the real collective still runs
        return counted

    originals = {name: getattr(dist, name) for name in COUNTED}
    for name, real in originals.items():
        setattr(dist, name, wrap(name, real))
    try:
        yield
    finally:
        for name, real in originals.items():
            setattr(dist, name, real)


def cases():
    """(name, make_state, hook) per row; make_state gives the hook's state for a fresh model."""
    yield "allreduce (= no hook)", lambda: None, default_hooks.allreduce_hook
    yield "fp16_compress_hook", lambda: None, default_hooks.fp16_compress_hook
    yield "bf16_compress_hook", lambda: None, default_hooks.bf16_compress_hook
    for r in (1, 4):
        state = partial(powerSGD_hook.PowerSGDState, process_group=None, matrix_approximation_rank=r,
                        start_powerSGD_iter=2)
        yield f"powerSGD rank {r}", state, powerSGD_hook.powerSGD_hook


def make_model(args, device):
    torch.manual_seed(0)
    return getattr(torchvision.models, args.model)(weights=None, num_classes=10).to(device)


def run_case(args, device, make_state, hook, serialize):
    """--steps real DDP steps with `hook`: (counts of the last step, median step seconds)."""
    ddp = DDP(make_model(args, device), device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(make_state(), one_bucket_at_a_time(hook) if serialize else hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(dist.get_rank())
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    times = []
    for _ in range(args.steps):
        counts: dict[str, list[int]] = {}
        start_together(device)
        t0 = time.perf_counter()
        with counting_collectives(counts):
            loss = F.cross_entropy(ddp(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the hook runs here, bucket by bucket
            optimizer.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return counts, slowest_median(times[WARM_STEPS:], device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4, 16, 64, 100],
                   help="float32 all-reduce message sizes in MB (1e6 bytes)")
    p.add_argument("--iters", type=int, default=5, help="timed all-reduces per size")
    p.add_argument("--model", choices=["resnet50", "resnet18"], default="resnet50")
    p.add_argument("--steps", type=int, default=6, help=f"DDP steps per hook (> {WARM_STEPS})")
    p.add_argument("--batch-size", type=int, default=8, help="images per rank")
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args()
    if args.steps <= WARM_STEPS:
        p.error(f"--steps must be more than {WARM_STEPS}: the first {WARM_STEPS} are not timed")

    device = setup()
    rank, n, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    say = print if rank == 0 else (lambda *a, **k: None)

    say(f"All-reduce bandwidth: {backend}, {n} process(es), float32 on {device.type}, "
        f"median of {args.iters} (slowest rank), torch {torch.__version__}")
    columns = [("size MB", ">9.1f"), ("time ms", ">10.2f"), ("algbw GB/s", ">11.2f"), ("busbw GB/s", ">11.2f")]
    say(header(columns))
    for figures in bandwidth(args.sizes_mb, args.iters, device):
        say(row(columns, figures))
    if n == 1:
        say("note: world size 1: busbw = algbw * 2(n-1)/n is 0 and the all-reduce moves nothing (algbw "
            "is meaningless); run under torchrun with --nproc_per_node >= 2")

    trainable = [q for q in make_model(args, device).parameters() if q.requires_grad]
    params, grad_bytes = sum(q.numel() for q in trainable), sum(q.numel() * q.element_size() for q in trainable)
    say(f"\nGradient communication per DDP step: {args.model} ({params / 1e6:.2f}M params, grads "
        f"{grad_bytes / MB:.2f} MB), {backend}, {n} process(es), batch {args.batch_size} x 3x"
        f"{args.image_size}x{args.image_size} per rank; bytes per rank of step {args.steps} of {args.steps}")
    columns = [("hook", "<22"), ("MB/step", ">9.2f"), ("vs none", ">8.3f"), ("step ms", ">8.0f"),
               ("collective calls", " <18"), ("ran", "")]  # " <18": two spaces before the column
    say(header(columns))
    base = grad_bytes  # replaced by the allreduce row's measured bytes (they should be equal)
    for name, make_state, hook in cases():
        reason = "failed on another rank"
        serialize = backend == "gloo" and n > 1 and hook is powerSGD_hook.powerSGD_hook
        try:
            counts, sec = run_case(args, device, make_state, hook, serialize)
            failed = torch.zeros(1, device=device)
        except Exception as e:  # noqa: BLE001 - any failure of the hook is reported, the rest still run
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:90]
            failed = torch.ones(1, device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # a row counts as run only if it ran on every rank
        if failed.item():
            say(row(columns, [name, "-", "-", "-", "-", f"not supported on {backend}: {reason}"]))
            continue
        total = sum(b for _, b in counts.values())
        base = total if hook is default_hooks.allreduce_hook else base
        calls = ", ".join(f"{k} x{c}" for k, (c, _) in counts.items())
        ran = "yes (serialized)" if serialize else "yes"
        say(row(columns, [name, total / MB, total / base, sec * 1e3, calls, ran]))
    say(f"note: step ms is the median of the last {args.steps - WARM_STEPS} steps (slowest rank); "
        "on a shared CPU it is noisy and mostly compute")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
