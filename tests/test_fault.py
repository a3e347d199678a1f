"""Fault tolerance, for real under torchrun: a killed worker, a preempted job, a torn checkpoint.

Every run here trains the tiny shards for 3 epochs of 16 steps with a checkpoint every
5 steps, and must end with exactly the weights of one uninterrupted run with the same seed.
(A SIGSTOPped rank that makes the others fail within dist.timeout_s is tested in test_train.py.)
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import run_train, tiny_args, train_cmd
from recog.checkpoint import load_checkpoint
from recog.preempt import EXIT_CODE

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 16  # ceil(ceil(1000 / 2) / 32)


def args(tiny_data, run_dir=None):
    out = tiny_args(tiny_data, epochs=3, **{"checkpoint.every_steps": 5})
    return out + ([f"hydra.run.dir={run_dir}"] if run_dir else [])


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_train(args(tiny_data, run_dir), cwd=run_dir.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def assert_same_weights(run_dir: Path, reference: dict):
    final = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert final["step"] == reference["step"] == 3 * STEPS_PER_EPOCH
    assert final["model"].keys() == reference["model"].keys()
    differ = [k for k in final["model"] if not torch.equal(final["model"][k], reference["model"][k])]
    assert not differ, f"weights differ from the uninterrupted run's: {differ}"
    assert all(torch.equal(a, b) for a, b in zip(final["optimizer"]["state"][0].values(),
                                                   reference["optimizer"]["state"][0].values()))


def start(cmd_args, cwd: Path, torchrun_flags=()) -> subprocess.Popen:
    """torchrun with 2 processes in the background; its output goes to a file (see `finish`)."""
    cmd = train_cmd(2)
    cmd = cmd[:3] + list(torchrun_flags) + cmd[3:] + cmd_args
    out = open(cwd / "torchrun.out", "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                            stderr=subprocess.STDOUT, text=True)
    proc.out_path = Path(out.name)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for torchrun and return its output (from a file: a leftover process holding a pipe open
    could not make this wait forever)."""
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    return proc.out_path.read_text()


def wait_for(pattern_dir: Path, name: str, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """Poll until a file `name` appears somewhere under `pattern_dir` (the run directory is made by the run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(pattern_dir.glob(f"**/checkpoints/{name}"))
        if found:
            return found[0]
        assert proc.poll() is None, finish(proc)
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no {name} after {timeout} s: {finish(proc)}")


def worker_pid(agent: int, rank: int) -> int:
    """The pid of the training process of `rank` started by the torchrun agent `agent`."""
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no rank {rank} among the children of {agent}")


def test_a_killed_worker_is_restarted_and_the_job_ends_as_if_nothing_happened(tiny_data, tmp_path, uninterrupted):
    """torchrun --max-restarts=1; SIGKILL rank 1 in epoch 2. The run directory comes from ${launch_time:},
    which the restarted workers find again in the agent's store."""
    proc = start(args(tiny_data), tmp_path, ["--max-restarts=1"])
    wait_for(tmp_path / "outputs", "step-000000020.pt", proc)  # epoch 2, 4 steps in
    os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 0, out
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1, runs  # the restarted workers went on in the same run directory
    log = (runs[0] / "train.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, log
    # from a mid-epoch checkpoint: step 20 or a later one written before the kill landed
    step = int(resumed[0].split("step-")[1][:9])
    assert step >= 20 and step % STEPS_PER_EPOCH and f"step {step}, 1 epoch(s) done and {step - 16} of 16" in resumed[0]
    assert_same_weights(runs[0], uninterrupted)
    # the killed worker's data-loader workers and fork server left too (they ignore SIGTERM, and watch
    # the training process instead)
    assert wait_for_no_orphans() == []


def wait_for_no_orphans(timeout: float = 10) -> list[int]:
    """Fork servers of recog's data loaders left without their training process (parent pid 1)."""
    deadline = time.monotonic() + timeout
    while True:
        orphans = []
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == 1 and b"multiprocessing.forkserver" in cmdline and b"recog.data.stream" in cmdline:
                orphans.append(int(proc.name))
        if not orphans or time.monotonic() > deadline:
            return orphans
        time.sleep(0.2)


def test_sigterm_saves_at_the_next_step_and_the_same_command_continues(tiny_data, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start(args(tiny_data, run_dir), tmp_path)
    wait_for(run_dir, "step-000000020.pt", proc)
    proc.send_signal(signal.SIGTERM)  # to torchrun, as Kubernetes or scancel would: it passes it on to the workers
    out = finish(proc)
    # the workers exit cleanly; the one traceback is torchrun's own, reporting the signal it got
    assert "Error executing job" not in out and out.count("Traceback") == 1 and "SignalException" in out, out
    assert "preempted: stopped on SIGTERM at step" in out and f"exit code {EXIT_CODE}" in out, out
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    stopped_at = saved["step"]
    assert 20 <= stopped_at < 3 * STEPS_PER_EPOCH, stopped_at
    assert f"checkpoint {run_dir}/checkpoints/step-{stopped_at:09d}.pt written" in out
    assert sum(saved["data"]["consumed"]) == stopped_at - STEPS_PER_EPOCH * saved["epoch"]

    again = run_train(args(tiny_data, run_dir), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {run_dir}/checkpoints/step-{stopped_at:09d}.pt: step {stopped_at}" in again.stdout
    assert_same_weights(run_dir, uninterrupted)


def test_exit_code_75_when_the_workers_are_signalled_directly(tiny_data, tmp_path):
    """SIGUSR1 (what SLURM sends before the time limit) to one worker only: both ranks stop at the same
    step; without --max-restarts torchrun then reports the workers' exit code."""
    run_dir = tmp_path / "run"
    proc = start(args(tiny_data, run_dir), tmp_path)
    wait_for(run_dir, "step-000000010.pt", proc)
    os.kill(worker_pid(proc.pid, 1), signal.SIGUSR1)
    out = finish(proc)
    assert proc.returncode != 0 and f"exitcode  : {EXIT_CODE}" in out, out
    assert "stopped on another rank's signal" in (run_dir / "train.log").read_text()  # rank 0 got none itself
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] > 10


def test_a_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(tiny_data, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start(args(tiny_data, run_dir), tmp_path)
    wait_for(run_dir, "step-000000025.pt", proc)
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    previous = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # as a crashed node's disk may leave it

    again = run_train(args(tiny_data, run_dir), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"checkpoint {newest} could not be read" in again.stdout and "Trying the one before it." in again.stdout
    assert f"resumed from {previous}" in again.stdout
    assert_same_weights(run_dir, uninterrupted)
