"""The README's commands, run as written: taken from README.md itself (so an edit there is tested), with
paths moved into a temporary folder and fewer epochs. The two fresh-machine commands are CI's (.ci/run)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, tiny_args

from recog.data.loader import loader_workers

README = (ROOT / "README.md").read_text()
BIN = str(Path(sys.executable).parent)


def bash_blocks() -> list[str]:
    """The README's ```bash blocks, continuation lines joined."""
    return [block.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)```", README, re.S)]


def commands() -> list[str]:
    return [line.split("  #")[0].strip() for block in bash_blocks() for line in block.splitlines() if line.strip()]


def command(pattern: str) -> str:
    found = [c for c in commands() if re.search(pattern, c)]
    assert len(found) == 1, f"README: {len(found)} commands match {pattern!r}: {found}"
    return found[0]


def here(cmd: str, tmp_path: Path) -> str:
    """The command on this machine: this venv's programs, /tmp paths inside tmp_path."""
    return cmd.replace("/tmp/", f"{tmp_path}/").replace(".venv/bin/", BIN + "/")  # BIN may lie under /tmp


def test_every_readme_command_is_run_by_ci_or_a_test():
    ci = (ROOT / ".ci" / "run").read_text()
    fresh, tests = bash_blocks()[:2]
    assert fresh.strip() in ci and tests.strip() in ci  # CI runs the two commands exactly as written
    covered = [fresh.strip(), tests.strip()] + [command(p) for p in (
        r"tensorboard --logdir", r"recog\.data write folder", r"train\.py data=images",
        r"experiment=retrieval_fashion", r"--nnodes=4", r"recog\.export ", r"recog\.embed .*/train ",
        r"recog\.index build", r"recog\.identify ", r"recog\.embed .*/test ", r"recog\.evaluate ", r"recog\.serve ",
        r"curl -F ")]
    assert sorted(covered) == sorted(commands()), "a README command that no test runs"
    # the multi-node command: tests/test_launch.py runs it on two hosts (network namespaces), 1 process each
    launch_test = (ROOT / "tests" / "test_launch.py").read_text()
    for flag in re.findall(r"--(rdzv-backend=c10d|rdzv-endpoint|rdzv-id)", command(r"--nnodes=4")):
        assert f"--{flag}" in launch_test


@pytest.mark.slow
def test_your_own_data_commands_and_what_they_print(tmp_path):
    """`bench/quality_data.py` (class folders of PNGs), the writer loop, then train.py with no flag but the
    paths (and one epoch): what recog prints about its choices is the line the README shows."""
    folders = re.search(r"`(\.venv/bin/python bench/quality_data\.py [^`]*)`", README).group(1)
    train = here(command(r"train\.py data=images"), tmp_path) + f" epochs=1 hydra.run.dir={tmp_path / 'run'}"
    script = "\n".join([here(folders, tmp_path), here(command(r"recog\.data write folder"), tmp_path), train])
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=1200, env={"OMP_NUM_THREADS": "1", "PATH": f"{BIN}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shown = re.search(r"```\n(data: .*?)\n```", README).group(1)
    # The README's line is from a 2-core machine; the worker count is this machine's (2 ranks share its cores).
    cores = len(os.sched_getaffinity(0))
    shown = re.sub(r"\d+ loader worker\(s\) per rank \(auto: \d+ cores",
                   f"{loader_workers('auto', 2, cores)} loader worker(s) per rank (auto: {cores} cores", shown)
    assert f"INFO] {shown}\n" in result.stdout
    assert '"eval_samples": 2000' in (tmp_path / "run" / "metrics.json").read_text()


@pytest.mark.slow
def test_retrieval_identify_and_serve_commands_run_in_order(tiny_data, tmp_path):
    """The Retrieval, Identify and Serve sections' commands, one after the other as a user runs them (tiny
    shards, one epoch): train, export, embed the gallery on 2 processes, index it, identify a photo, embed the
    queries and evaluate them against the gallery on 2 processes; then serve the export and index, and ask it
    about the photo with curl: the same answer as recog.identify's."""
    import json

    from identify_setup import fashion_test_images

    photo = fashion_test_images(tmp_path / "photos", 1)[0][0]
    shards = "data/shards/fashion-mnist-small/"
    steps = [here(command(r"experiment=retrieval_fashion"), tmp_path) + " " + " ".join(
        tiny_args(tiny_data, epochs=1) + ["sampler.p=3", "sampler.k=8"])]
    identify = (r"recog\.export ", r"recog\.embed .*/train ", r"recog\.index build", r"recog\.identify ",
                r"recog\.embed .*/test ", r"recog\.evaluate ")
    steps += [here(command(p), tmp_path) for p in identify]
    script = "\n".join(step.replace("outputs/retrieval", str(tmp_path / "retrieval")).replace(
        shards, f"{tiny_data['train'].parent}/").replace("photo.png", str(photo)) for step in steps)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=1200, env={"OMP_NUM_THREADS": "1", "PATH": f"{BIN}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "recall@1" in (tmp_path / "retrieval" / "metrics.json").read_text()
    assert f"{photo}: " in result.stdout and "1. " in result.stdout  # its vote, then its top matches
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["queries"] == 301 and 0 < metrics["vote_top1"] <= 1 and 0 < metrics["recall@1"] <= 1

    port = str(free_port())
    serve, curl = (here(command(p), tmp_path).replace(shards, f"{tiny_data['train'].parent}/").replace(
        "8000", port).replace("photo.png", str(photo)) for p in (r"recog\.serve ", r"curl -F "))
    server = subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={"OMP_NUM_THREADS": "1",
                                                                         "PATH": f"{BIN}:/usr/bin:/bin"})
    try:
        for line in server.stdout:  # its log, until it listens
            if "listening on" in line:
                break
        answer = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60,
                                           check=True).stdout)
    finally:
        server.terminate()
        server.wait(60)
    assert server.returncode == 0
    shown = result.stdout[result.stdout.index(f"{photo}: "):]
    assert shown.startswith(f"{photo}: {answer['vote']}\n")
    assert [m["key"] for m in answer["matches"]] == re.findall(r"\d\. \S+  .*  (\S+)\n", shown)[:5]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_command_serves_a_run(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "outputs" / "run1" / "tb")) as writer:
        writer.add_scalar("eval/top1", 0.5, 1)
    port = free_port()
    cmd = here(command(r"tensorboard --logdir"), tmp_path).replace("--port 6006", f"--port {port}")
    cmd = cmd.split() + ["--host", "127.0.0.1"]
    server = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, runs = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "run1" not in runs:
            time.sleep(1)
            try:
                runs = urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5).read().decode()
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
        assert "run1/tb" in runs
    finally:
        server.terminate()
        server.wait(30)
