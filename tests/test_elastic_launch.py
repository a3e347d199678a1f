"""Elastic training under real torchrun: the same global batch on 1 and 2 processes, and a run that loses one
of its two agents (`--nnodes=1:2`, c10d rendezvous) mid-epoch and finishes on the survivor alone."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_train, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_launch import free_port

from recog.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def loss_curve(run_dir) -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {s.step: s.value for s in events.Scalars("train/loss")}


def parameter_difference(a, b) -> float:
    """Largest |difference| of the models' parameters (BatchNorm's running statistics, used only when
    evaluating, follow rank 0's micro-batches under DDP and so differ by design)."""
    x, y = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return max((x[k] - y[k]).abs().max().item() for k in x if "running" not in k and "num_batches" not in k)


def test_a_global_batch_trains_alike_on_one_and_two_processes(tiny_data, tmp_path):
    """global_batch=64 of batch_size=16: 4 forward passes a step, all on one process or 2 on each of two. The
    same images meet the same weights in the same BatchNorm batches; only the order of float additions differs."""
    curves = {}
    for nproc in (None, 2):
        run_dir = tmp_path / f"run-{nproc}"
        args = tiny_args(tiny_data, batch_size=16, global_batch=64, log_every=1) + [f"hydra.run.dir={run_dir}"]
        result = run_train(args, cwd=tmp_path, nproc=nproc)
        assert result.returncode == 0, result.stdout + result.stderr
        curves[nproc] = loss_curve(run_dir)
    alone, two = curves[None], curves[2]
    assert sorted(alone) == sorted(two) == list(range(1, 17))  # ceil(ceil(1000 / 4) / 16) steps
    differences = [abs(alone[s] - two[s]) for s in alone]
    print(f"loss curves, 1 vs 2 processes: max |difference| {max(differences):.2e} over 16 steps; "
          f"first step {differences[0]:.1e}")
    assert differences[0] <= 1e-6 and max(differences) <= 1e-3


def start_agent(port: int, args: list[str], log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=3",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test",
           "--rdzv-conf=last_call_timeout=15", str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_machine(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and everything under it (its worker, the worker's fork server and loader workers): a
    machine that is gone."""
    def tree(pid: int) -> list[int]:
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        return [pid] + [p for child in children.split() for p in tree(int(child))]

    for pid in tree(agent.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()


def test_losing_one_of_two_agents_mid_epoch_finishes_on_the_survivor_as_if_nothing_happened(tiny_data, tmp_path):
    """Two agents, one process each, global batch 64 (4 micro-batches of 16), checkpoints every 2 steps. One agent (not
    the one hosting the rendezvous store) is killed during epoch 2; the survivor's worker stops (its peer went
    away), torchrun starts it again in a group of one, and it continues from the last checkpoint with the same
    global batches: its first steps there give the uninterrupted run's losses to float precision; after that,
    the order of float additions (one process sums the 4 micro-batches, two sum 2 each and all-reduce) differs by a
    rounding, which training magnifies step by step as it does any rounding: the bound is set against a run on
    one process from the start, which differs from the reference in that way alone."""
    common = tiny_args(tiny_data, epochs=3, batch_size=16, global_batch=64, log_every=1,
                       **{"checkpoint.every_steps": 2, "optim": "sgd"})
    reference, alone = tmp_path / "reference", tmp_path / "alone"
    for run_dir, nproc in ((reference, 2), (alone, None)):
        result = run_train(common + [f"hydra.run.dir={run_dir}"], cwd=tmp_path, nproc=nproc)
        assert result.returncode == 0, result.stdout + result.stderr

    run_dir, port = tmp_path / "elastic", free_port()
    args = common + [f"hydra.run.dir={run_dir}"]
    with open(tmp_path / "host.log", "w") as host_log, open(tmp_path / "other.log", "w") as other_log:
        host = start_agent(port, args, host_log)  # binds the port: the rendezvous store lives here
        time.sleep(1)
        other = start_agent(port, args, other_log)
        try:
            deadline = time.monotonic() + 240
            while not (run_dir / "checkpoints" / "step-000000020.pt").exists():  # epoch 2 of 3, step 4 of 16
                assert time.monotonic() < deadline and host.poll() is None, (tmp_path / "host.log").read_text()
                time.sleep(0.02)
            kill_machine(other)
            code = host.wait(timeout=300)
        finally:
            kill_machine(other)
            kill_machine(host)
    log = (run_dir / "train.log").read_text()
    assert code == 0, (tmp_path / "host.log").read_text()[-3000:]
    assert "world size 2 (gloo on cpu)" in log and "world size changed from 2 to 1" in log, log
    resumed = int(re.search(r"resumed from \S*step-(\d+)\.pt: step \d+, 1 epoch\(s\) done and \d+ of 16 steps of "
                            r"epoch 2", log)[1])  # mid-epoch, not from the epoch's start
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["step"] == 48 and last["epoch"] == 3  # 16 steps an epoch, each once
    ours, theirs = loss_curve(run_dir), loss_curve(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, 49))
    assert all(abs(ours[s] - theirs[s]) <= 1e-6 for s in range(1, resumed + 4))  # and 3 steps on one process
    difference = parameter_difference(run_dir / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")
    floor = parameter_difference(alone / "checkpoints" / "last.pt", reference / "checkpoints" / "last.pt")
    print(f"against the uninterrupted 2-process run, max |parameter difference|: elastic (world size 1 from step "
          f"{resumed}) {difference:.1e}, one process throughout {floor:.1e}; loss curves: "
          f"{max(abs(ours[s] - theirs[s]) for s in ours):.1e}")
    assert difference <= max(1e-4, floor) and difference <= 1e-3
