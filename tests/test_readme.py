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


def section_blocks(title: str) -> list[list[str]]:
    """The commands of each ```bash block of README section `title`, in order."""
    section = README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", section, re.S)]
    return [[line.split("  #")[0].strip() for line in block.splitlines() if line.strip()] for block in blocks]


def section_commands(title: str) -> list[str]:
    return [c for block in section_blocks(title) for c in block]


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
        r"tensorboard --logdir", r"recog\.data write folder /tmp/images", r"train\.py data=images data\.train=/",
        r"experiment=retrieval_fashion", r"--nnodes=4", r"recog\.export outputs/retrieval",
        r"recog\.embed .*/train ", r"recog\.index build /tmp/gallery", r"recog\.identify ", r"recog\.embed .*/test ",
        r"recog\.evaluate ", r"recog\.serve ", r"curl -F ")]
    covered += section_commands("A catalogue that grows")  # tests/test_readme.py runs them all, in order
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
    train = here(command(r"train\.py data=images data\.train=/"), tmp_path) + f" epochs=1 hydra.run.dir={tmp_path}/run"
    write = here(command(r"recog\.data write folder /tmp/images"), tmp_path)
    script = "\n".join([here(folders, tmp_path), write, train])
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
    identify = (r"recog\.export outputs/retrieval", r"recog\.embed .*/train ", r"recog\.index build /tmp/gallery",
                r"recog\.identify ",
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


def day_folders(out: Path, per_class: dict[str, int]) -> dict[str, Path]:
    """bench/growth.py's two days (and test split) of class folders, cut to `per_class` images a class."""
    sys.path.insert(0, str(ROOT / "bench"))
    import growth

    full = growth.write_folders(out / "full")
    for name, count in per_class.items():
        for folder in sorted(full[name].iterdir()):
            (out / name / folder.name).mkdir(parents=True)
            for png in sorted(folder.iterdir())[:count]:
                (out / name / folder.name / png.name).write_bytes(png.read_bytes())
    return {name: out / name for name in per_class}


class ServeLog:
    """A recog.serve process's log lines, read on a thread; `wait_for` a line matching a pattern."""

    def __init__(self, server: subprocess.Popen):
        import threading

        self.lines, self.server = [], server
        threading.Thread(target=lambda: self.lines.extend(server.stdout), daemon=True).start()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while sum(bool(re.search(pattern, line)) for line in list(self.lines)) < count:
            assert time.monotonic() < deadline and self.server.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.2)


def ask(port: int, png: Path) -> dict:
    import json

    request = urllib.request.Request(f"http://127.0.0.1:{port}/identify?k=5", data=png.read_bytes(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def run_script(commands: list[str], env: dict) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{BIN}:/usr/bin:/bin", **env}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], cwd=ROOT, capture_output=True,
                            text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_catalogue_that_grows_commands_run_in_order(tmp_path):
    """A catalogue that grows: day 1 (7 classes) trained, exported, embedded, indexed and served through links;
    then the section's first block (day 2's shards embedded by the served model, `index add`, SIGHUP): the service
    answers a new class's photo from the grown index without a restart; then the second (day 1's model continued
    on both folders, one epoch here, exported, both folders embedded into a new index, the links switched,
    SIGHUP): the new model answers."""
    import json

    photos = day_folders(tmp_path / "photos", {"day1": 60, "day2": 40, "test": 20})
    live, shards = tmp_path / "live", tmp_path / "shards"
    day1 = [f"python -m recog.data write folder {photos[n]} {shards / n}" for n in ("day1", "test")] + [
        f"torchrun --standalone --nproc_per_node=2 train.py data=images data.train={shards / 'day1'} "
        f"data.test={shards / 'day1'} epochs=1 hydra.run.dir={tmp_path / 'outputs' / 'day1'}",
        f"python -m recog.export {tmp_path / 'outputs/day1/checkpoints/last.pt'} {tmp_path / 'models/day1'}",
        f"torchrun --standalone --nproc_per_node=2 -m recog.embed model={tmp_path / 'models/day1'} "
        f"data={shards / 'day1'} out={tmp_path / 'embeddings/day1'}",
        f"python -m recog.index build {tmp_path / 'embeddings/day1'} {tmp_path / 'indexes/day1'}",
        f"mkdir {live} && ln -s {tmp_path / 'models/day1'} {live / 'model'} && "
        f"ln -s {tmp_path / 'indexes/day1'} {live / 'index'}"]
    run_script(day1, {})
    port = free_port()
    server = subprocess.Popen([f"{BIN}/python", "-m", "recog.serve", "--model", str(live / "model"), "--index",
                               str(live / "index"), "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={"OMP_NUM_THREADS": "1",
                                                                         "PATH": f"{BIN}:/usr/bin:/bin"})
    log = ServeLog(server)
    new_photo = next((photos["day2"] / "Bag").iterdir())  # a class day 1 did not have
    try:
        log.wait_for("listening on")
        before = ask(port, new_photo)
        assert before["index_generation"] == 0 and "Bag" not in [m["class"] for m in before["matches"]]
        moved = [c.replace("outputs/day", f"{tmp_path}/outputs/day") for c in (here(c, tmp_path) for c in
                 section_commands("A catalogue that grows"))]
        first = section_blocks("A catalogue that grows")[0]
        run_script(moved[:len(first)], {"SERVE_PID": str(server.pid)})
        log.wait_for("reloaded in")
        grown = ask(port, new_photo)
        assert grown["index_generation"] == 1 and grown["model_sha256"] == before["model_sha256"]
        assert "Bag" in [m["class"] for m in grown["matches"]]  # the new class, answered from today's items
        trained = run_script([c + " epochs=1" if "train.py" in c else c for c in moved[len(first):]],
                             {"SERVE_PID": str(server.pid)})
        assert "classifier mapped by class name (names from the checkpoint): 7 kept, 3 new (imprinted from up to " \
               "32 images each), 0 dropped" in trained.stdout + trained.stderr
        log.wait_for("reloaded in", count=2)
        new_model = json.loads((tmp_path / "indexes" / "day2" / "index.json").read_text())["model_sha256"]
        after = ask(port, new_photo)
        assert after["model_sha256"] == new_model != before["model_sha256"] and after["index_generation"] == 1
    finally:
        server.terminate()
        server.wait(60)
    assert server.returncode == 0
