"""Nothing lost, nothing hangs, every mistake named: recog tried as a careless user and an adversary would,
and its fault tolerance (a killed worker restarted, a preempted job continued, a torn checkpoint, a stopped
rank) ending with the weights of an uninterrupted run.

Each test runs train.py for real (mostly under torchrun with 2 processes and a data-loader worker each)
and checks three things: the job ends within a bound after the failure, it says what went wrong in one
sentence (or, for a programming error, with its traceback), and no recog process (rank, data-loader
worker, fork server) is left behind. Processes are found by a tag in their environment, which every
child inherits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import recog_frames, run_train, tiny_args, train_cmd
from http_server import CountingServer

from recog.checkpoint import load_checkpoint
from recog.data.plan import count_done
from recog.preempt import EXIT_CODE

pytestmark = pytest.mark.slow


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment holds RECOG_TEST_TAG=tag."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"RECOG_TEST_TAG={tag}\0".encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return pids


class Run:
    """train.py started in the background; `finish()` waits for it with a bound on the time after `marker`."""

    def __init__(self, args: list[str], cwd: Path, nproc: int | None = 2, env: dict | None = None):
        self.tag, self.cwd = uuid.uuid4().hex, cwd
        self.out_path, self.err_path = cwd / f"stdout-{self.tag}", cwd / f"stderr-{self.tag}"
        # output to files: a process left behind holding a pipe open could make a read wait forever
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            # a session of its own, like a job started from a terminal: a Ctrl-C reaches its whole process group
            env = {**os.environ, "OMP_NUM_THREADS": "1", "RECOG_TEST_TAG": self.tag, **(env or {})}
            self.proc = subprocess.Popen(train_cmd(nproc) + args, cwd=cwd, stdout=out, stderr=err, text=True,
                                         start_new_session=True, env=env)
        self.returncode: int | None = None
        self.exit_after_marker_s: float | None = None

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, text: str, timeout: float = 180) -> float:
        """Wait until `text` appears in the output; return the time it was seen."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.stdout + self.stderr:
                return time.time()
            if self.proc.poll() is not None and text not in self.stdout + self.stderr:
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}:\n{self.stdout[-3000:]}"
                                     f"\n{self.stderr[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not seen within {timeout} s:\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}")

    def finish(self, marker: str | None = None, within_s: float = 30, start_timeout: float = 240) -> "Run":
        """Wait for the job to end; with `marker`, it must end within `within_s` of the marker's appearance.
        Then no process of the job may be left (a grace of a few seconds for the last ones to be reaped)."""
        try:
            seen = self.wait_for(marker, start_timeout) if marker else time.time()
            try:
                self.proc.wait(timeout=within_s + (0 if marker else start_timeout))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"still running {within_s} s after {marker!r} (a hang):\n"
                                     f"{self.stdout[-3000:]}\n{self.stderr[-3000:]}") from None
            self.exit_after_marker_s = time.time() - seen
            self.returncode = self.proc.returncode
            deadline = time.time() + 5
            while tagged_pids(self.tag) and time.time() < deadline:
                time.sleep(0.2)
            left = tagged_pids(self.tag)
            assert not left, f"processes left behind: {[describe(p) for p in left]}"
        finally:
            self.kill()
        return self

    def kill(self) -> None:
        self.proc.kill()
        for pid in tagged_pids(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def recog_traceback(self) -> bool:
        """Whether recog's processes printed a traceback (torchrun's own ChildFailedError report aside)."""
        return bool(recog_frames(self.stderr))


# A traceback line of recog's own code: a module of a `recog` package folder (recog/train.py, recog/data/plan.py)
# or a checkout's train.py, never a library's. Not any line that names "recog": in a checkout named recog (where
# `git clone` puts it) with its .venv inside, torchrun's own frames do.
def describe(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except FileNotFoundError:
        return str(pid)


def copy_data(tiny_data, tmp_path: Path) -> dict[str, Path]:
    out = {split: tmp_path / "data" / split for split in ("train", "test")}
    for split, path in out.items():
        shutil.copytree(tiny_data[split], path)
    return out


# --- Failures after the data-loader workers started: the whole job ends, promptly and completely ---

def test_strict_run_on_a_damaged_shard_stops_every_process(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    shard = data["train"] / "train-000001.tar"
    shard.write_bytes(os.urandom(shard.stat().st_size))
    run = Run(tiny_args(data, epochs=2, **{"data.strict": "true", "data.num_workers": 1}), tmp_path).finish(
        marker="could not be read")
    assert run.returncode != 0
    assert any("train-000001.tar could not be read" in e for e in run.errors()), run.stderr[-3000:]
    assert not run.recog_traceback(), run.stderr[-3000:]


def test_a_shard_that_disappears_from_the_server_mid_run_stops_every_process(tiny_data, tmp_path):
    server = CountingServer(tiny_data["train"].parent)
    try:
        def break_shard_after_first_epoch():  # streamed (no cache): epoch 2 asks for the shard again
            while server.counts["/train/train-000000.tar"] < 1:
                time.sleep(0.05)
            server.fail_next("/train/train-000000.tar", 404)

        threading.Thread(target=break_shard_after_first_epoch, daemon=True).start()
        run = Run(tiny_args(tiny_data, epochs=3, **{
            "data.train": f"{server.url}/train", "data.test": f"{server.url}/test", "data.cache_dir": "null",
            "data.http.retries": 1, "data.http.backoff_s": 0.1}), tmp_path).finish(marker="404")
    finally:
        server.stop()
    assert run.returncode != 0
    assert any("train-000000.tar" in e and "404" in e for e in run.errors()), run.stderr[-3000:]
    assert not run.recog_traceback(), run.stderr[-3000:]


def test_a_full_disk_during_a_checkpoint_stops_every_process_and_keeps_the_earlier_ones(tiny_data, tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    # room for one checkpoint (~0.6 MB with this model) and a half: the second write runs out of space
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(checkpoints)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        args = tiny_args(tiny_data, epochs=2, **{"checkpoint.every_steps": 5, "checkpoint.keep": 5})
        run = Run(args + [f"hydra.run.dir={run_dir}"], tmp_path).finish(marker="No space left on device")
        assert run.returncode != 0
        assert any("No space left on device" in e and "step-000000010.pt" in e for e in run.errors()), run.stderr
        assert not run.recog_traceback(), run.stderr[-3000:]
        # the checkpoint written before the disk filled is intact, and no half-written file is left
        assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step-000000005.pt"]
        assert load_checkpoint(checkpoints / "last.pt")["step"] == 5
        assert not [p for p in checkpoints.iterdir() if ".tmp" in p.name]
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)])


def test_a_programming_error_in_a_data_worker_shows_its_traceback_and_stops_every_process(tiny_data, tmp_path):
    # A crop larger than the 28x28 images fails inside the data-loader workers: not a mistake recog can name
    # in a sentence, so the traceback is shown; the job must still end, all of it.
    crop = "augment.train={_target_: torchvision.transforms.v2.RandomCrop, size: 64}"
    run = Run(tiny_args(tiny_data, **{"data.num_workers": 1}) + ["augment=none", crop], tmp_path).finish(
        marker="larger than input image size")
    assert run.returncode != 0
    assert "Traceback" in run.stderr and "RandomCrop" in run.stderr or "crop size" in run.stderr


def test_ctrl_c_saves_a_checkpoint_after_the_current_step_and_exits_130(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    # batches of 8: 125 steps an epoch, so that the signal, sent once step 5's line is out, lands in the first one
    # (a fixed sleep did not: once the workers' fork server came for free, 2 s was past the first epoch)
    run = Run(tiny_args(tiny_data, epochs=50, batch_size=8, **{"data.num_workers": 1}) + [f"hydra.run.dir={run_dir}"],
              tmp_path, nproc=None)
    run.wait_for("step 5/")
    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the trainer, fork server and workers
    run.finish(marker="interrupted", within_s=30)
    assert run.returncode == 130, run.stderr[-3000:]
    assert "KeyboardInterrupt" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in (run.stdout + run.stderr).splitlines() if "interrupted" in line]
    assert len(lines) == 1, lines
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] > 0 and ckpt["epoch"] == 0 and count_done(ckpt["data"]["done"]) > 0  # mid-epoch, not lost
    # the same command continues from it
    again = Run(tiny_args(tiny_data, epochs=1, batch_size=8, **{"data.num_workers": 1}) + [f"hydra.run.dir={run_dir}"],
                tmp_path, nproc=None).finish()
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in again.stdout


# --- Mistakes named in one sentence, whichever rank finds them, before any rank waits on another ---

def one_sentence(run: Run, message: str) -> None:
    errors = run.errors()
    # exit code 2 (torchrun itself exits 1 and reports its workers' codes)
    assert run.returncode == 2 or (run.returncode == 1 and "exitcode  : 2" in run.stderr), run.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], run.stderr[-3000:]
    assert not run.recog_traceback(), run.stderr[-3000:]


@pytest.mark.parametrize("override,message", [
    ({"optim.lr": -1}, "optim.lr=-1 "),
    ({"optim.lr": "abc"}, "optim.lr=abc "),
    ({"data.shuffle_block": 0}, "data.shuffle_block=0 "),
    ({"sampler": "pk", "sampler.p": 1000}, "sampler.p=1000 "),
    ({"sampler": "pk", "sampler.k": 0}, "sampler.k=0 "),
])
def test_bad_values_are_named_before_training(tiny_data, tmp_path, override, message):
    one_sentence(Run(tiny_args(tiny_data, **override), tmp_path).finish(), message)


def test_fewer_training_samples_than_processes_is_named_not_called_damage(tiny_data, tmp_path):
    """One training sample trains on 1 process; on 2, rank 1 would have none: said as that, with the fix (it
    was "the shards are damaged")."""
    from conftest import tiny_split

    tiny_split(tmp_path / "one", "train", 1, 1)
    run = Run(tiny_args(tiny_data, **{"data.train": tmp_path / "one"}), tmp_path).finish()
    one_sentence(run, "holds 1 training sample(s), fewer than the 2 micro-batches")
    assert "rank 1 would have none; train on at most 1 process(es)" in run.errors()[0]


def test_a_gallery_without_retrieval_is_named():
    """eval.gallery was ignored without eval.retrieval=true."""
    from recog.config import check_config
    from recog.errors import ConfigError
    from recog.rundir import compose_train_config

    with pytest.raises(ConfigError, match=r"eval\.gallery=train is the gallery of the retrieval metrics, which "
                                          r"are off; add eval\.retrieval=true"):
        check_config(compose_train_config("eval.gallery=train", "data.train=x", "data.test=y"))
    with pytest.raises(ConfigError, match="no shards at x"):  # with retrieval, the gallery passes
        check_config(compose_train_config("eval.gallery=train", "eval.retrieval=true", "data.train=x", "data.test=y"))


def test_a_manifest_that_is_not_json_is_named(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    (data["train"] / "manifest.json").write_text("{ this is not json")
    one_sentence(Run(tiny_args(data), tmp_path).finish(), f"{data['train'] / 'manifest.json'} is not valid JSON")


def test_a_mistyped_data_path_is_an_error_and_nothing_is_written_there(tmp_path):
    """With the bundled data config, a path that does not exist is not filled with Fashion-MNIST."""
    for wrong in ({"data.train": tmp_path / "trian", "data.test": tmp_path / "tset"},
                  {"data.train": tmp_path / "trian"}):
        run = Run([f"{k}={v}" for k, v in wrong.items()] + ["epochs=1"], tmp_path).finish()
        one_sentence(run, f"no shards at {tmp_path / 'trian'}")
        assert not (tmp_path / "trian").exists() and not (tmp_path / "tset").exists()


def train_small(tiny_data, tmp_path, name: str, *extra: str) -> Path:
    run = Run(tiny_args(tiny_data, **{"data.num_workers": 0}) + [f"hydra.run.dir={tmp_path / name}", *extra],
              tmp_path, nproc=None).finish()
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp_path / name / "checkpoints" / "last.pt"


def test_resuming_another_models_checkpoint_is_named(tiny_data, tmp_path):
    convnet = train_small(tiny_data, tmp_path, "convnet")
    resnet = tiny_args(tiny_data, **{"model.width": None}) + ["model=resnet18"]  # a ResNet has no width
    run = Run(resnet + [f"resume={convnet}", f"hydra.run.dir={tmp_path / 'r18'}"], tmp_path).finish()
    one_sentence(run, f"{convnet} holds a convnet model")
    # the same through auto-resume: a run directory reused with another model
    run = Run(resnet + [f"hydra.run.dir={tmp_path / 'convnet'}"], tmp_path).finish()
    one_sentence(run, "holds a convnet model")


def test_weights_of_another_number_of_classes_drop_the_classifier(tiny_data, tmp_path):
    ten = train_small(tiny_data, tmp_path, "ten")
    state = load_checkpoint(ten)
    state["model"]["class_weights"] = torch.randn(7, state["model"]["class_weights"].shape[1])
    seven = tmp_path / "seven.pt"
    torch.save(state, seven)
    run = Run(tiny_args(tiny_data) + [f"weights={seven}", "optim.lr=0.0", f"hydra.run.dir={tmp_path / 'ft'}"],
              tmp_path).finish()
    assert run.returncode == 0, run.stderr[-3000:]
    notes = [line for line in run.stdout.splitlines() if "classifier" in line and " INFO] " in line]  # not the config
    assert len(notes) == 1 and "7 classes" in notes[0] and "10" in notes[0], run.stdout[-3000:]
    trained = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")["model"]
    assert torch.equal(trained["embed.weight"], state["model"]["embed.weight"])  # lr 0: the backbone was loaded


@pytest.mark.parametrize("option,content,message", [
    ("weights", "RANDOM", "is not a PyTorch checkpoint"),
    ("resume", "TEXT", "is not a PyTorch checkpoint"),
    ("weights", None, "check the path given to weights="),
])
def test_unreadable_weight_files_are_named_without_torch_advice(tiny_data, tmp_path, option, content, message):
    path = tmp_path / "file.pt"
    if content == "RANDOM":
        path.write_bytes(os.urandom(4096))
    elif content == "TEXT":
        path.write_text("a text file, not a checkpoint\n")
    run = Run(tiny_args(tiny_data) + [f"{option}={path}"], tmp_path).finish()
    one_sentence(run, message)
    assert "weights_only" not in run.stderr and "file an issue" not in run.stderr and "truncated" not in run.stderr


def test_warnings_about_skipped_samples_go_to_train_log(tiny_data, tmp_path):
    from test_data import corrupt_copy

    data = copy_data(tiny_data, tmp_path)
    corrupt_copy(tiny_data["train"] / "train-000001.tar", data["train"] / "train-000001.tar", {"000000400"})
    run = Run(tiny_args(data, **{"data.num_workers": 1}) + [f"hydra.run.dir={tmp_path / 'r'}"], tmp_path).finish()
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "r" / "train.log").read_text()
    assert "skipping undecodable sample" in log and "000000400" in log, log[-3000:]


def test_a_second_run_in_the_same_run_directory_stops_before_writing_there(tiny_data, tmp_path):
    """Two runs given one hydra.run.dir at once would interleave their checkpoints (best.pt of one, last.pt of the
    other). The first holds the directory (rank 0's lock, for the run's life); the second, started while the
    first trains, stops on both ranks with one sentence naming the directory, before it writes anything there."""
    run_dir = tmp_path / "run"
    first = Run(tiny_args(tiny_data, epochs=200, seed=0, **{"checkpoint.every_steps": 4})
                + [f"hydra.run.dir={run_dir}"], tmp_path)
    try:
        first.wait_for("per-rank batch")  # set up, holding the directory, training
        copy = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}  # Hydra's copy of the config
        second = Run(tiny_args(tiny_data, epochs=200, seed=1) + [f"hydra.run.dir={run_dir}"], tmp_path).finish()
        one_sentence(second, f"{run_dir} is being written by training run (pid ")
        assert "hydra.run.dir=" in second.errors()[0]
        assert first.proc.poll() is None, first.stderr[-3000:]  # the first goes on, undisturbed
        assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == copy  # its config copy too
        first.wait_for("epoch 1/200")  # and writes its checkpoints
    finally:
        first.kill()
    assert "seed: 1" not in (run_dir / "train.log").read_text()  # the second never logged there ...
    seeds = {load_checkpoint(p)["config"]["seed"] for p in (run_dir / "checkpoints").glob("*.pt")}
    assert seeds == {0}  # ... nor saved a checkpoint


def test_the_sentence_reaches_the_user_whichever_rank_finds_it_first(tiny_data, tmp_path):
    """Under load, rank 1 once found the mistake and exited first, and torchrun stopped rank 0 (SIGTERM) before
    it printed: the user saw no sentence. Here rank 0 is made slow on purpose, from outside recog: an audit hook
    (sitecustomize) holds it for 4 s when it imports recog.train, so rank 1 always exits first."""
    hook = tmp_path / "slow_rank0"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys, time\n"
        "def slow(event, args):\n"
        "    if event == 'import' and args[0] == 'recog.train' and os.environ.get('RANK') == '0':\n"
        "        time.sleep(4)\n"
        "sys.addaudithook(slow)\n")
    run = Run(tiny_args(tiny_data, **{"data.train": "/nonexistent/shards"}), tmp_path,
              env={"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}).finish()
    one_sentence(run, "no shards at /nonexistent/shards")


def test_a_programming_error_in_a_rank0_only_read_keeps_its_traceback(tiny_data, tmp_path):
    """weights= is read by rank 0 alone. An error there that is not a user's mistake (here injected from outside
    recog: an audit hook makes rank 0's open() of the file raise TypeError) keeps its whole traceback on rank 0
    (exit code 1); rank 1 stops too (told in a sentence, which its node leaves unsaid: rank 0 there already
    showed the traceback). Nothing hangs."""
    weights = train_small(tiny_data, tmp_path, "weights")
    hook = tmp_path / "broken_open"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "def broken(event, args):\n"
        f"    if event == 'open' and str(args[0]) == {str(weights)!r} and os.environ.get('RANK') == '0':\n"
        "        raise TypeError('injected programming error')\n"
        "sys.addaudithook(broken)\n")
    run = Run(tiny_args(tiny_data) + [f"weights={weights}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
              env={"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}).finish()
    # rank 0 exits 1, or, when rank 1 stopped first and torchrun sent SIGTERM meanwhile, -15: either way the
    # traceback is out first
    assert run.returncode == 1 and ("exitcode  : 1" in run.stderr or "exitcode  : -15" in run.stderr)
    # printed once (before rank 1 was told, not again at exit); torchrun's report has a traceback of its own
    assert "TypeError: injected programming error" in run.stderr
    assert run.stderr.count(", in run_on_rank0\n") == 1, run.stderr[-3000:]
    assert run.recog_traceback() and 'recog/checkpoint.py", line' in run.stderr  # where it happened
    assert not run.errors(), run.stderr[-3000:]  # no sentence stands in for the traceback


def test_the_config_is_checked_by_every_check_in_one_place():
    """Every value checked before a process group exists; a table of bad values and what they must say."""
    from recog.config import check_config
    from recog.errors import ConfigError
    from recog.rundir import compose_train_config

    bad = {"optim.lr=-1": "optim.lr=-1", "optim.lr=abc": "optim.lr=abc", "data.shuffle_block=0": "shuffle_block=0",
           "sampler.k=0": "sampler.k=0", "accumulate=0": "accumulate=0", "dist.timeout_s=0": "dist.timeout_s=0",
           "optim.reference_batch=0": "optim.reference_batch=0", "data.http.retries=-1": "data.http.retries=-1",
           "epochs=1.5": "epochs=1.5"}
    for override, message in bad.items():
        cfg = compose_train_config(override, "sampler=pk") if "sampler" in override else compose_train_config(override)
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            check_config(cfg)


# ---- fault tolerance: interrupted runs end with the weights of an uninterrupted one ----

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
    """Fork servers of recog's data loaders (or a rank: train.py's command line) left without their training
    process (parent pid 1)."""
    deadline = time.monotonic() + timeout
    while True:
        orphans = []
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            # multiprocessing's fork server, or the one train.py forks from itself (its command line is the rank's)
            spawned = b"multiprocessing.forkserver" in cmdline and b"recog.data.stream" in cmdline
            if ppid == 1 and (spawned or b"train.py" in cmdline):
                orphans.append(int(proc.name))
        if not orphans or time.monotonic() > deadline:
            return orphans
        time.sleep(0.2)


def test_sigterm_saves_within_a_second_and_the_same_command_continues(tiny_data, tmp_path, uninterrupted):
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
    assert count_done(saved["data"]["done"]) == stopped_at - STEPS_PER_EPOCH * saved["epoch"]

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


def test_a_stopped_rank_makes_the_other_fail_within_the_timeout(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # output to files: a leftover process holding a pipe open could make a read wait forever
    out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    proc = subprocess.Popen(train_cmd(2) + tiny_args(tiny_data, epochs=200, **{"dist.timeout_s": 8}) + [
        f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, stdout=out, stderr=err, text=True)
    ranks: dict[int, int] = {}  # rank -> pid
    try:
        deadline = time.time() + 120
        while len(ranks) < 2 and time.time() < deadline:  # wait until training runs, then find the ranks
            time.sleep(0.5)
            if (tmp_path / "run" / "checkpoints").exists():
                for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                            text=True).stdout.split():
                    environ = open(f"/proc/{child}/environ", "rb").read()
                    for rank in (0, 1):
                        if f"RANK={rank}\0".encode() in environ and b"LOCAL_RANK" in environ:
                            ranks.setdefault(rank, int(child))
        assert len(ranks) == 2, "training never started"
        os.kill(ranks[1], signal.SIGSTOP)  # rank 1 stops answering, without dying
        start = time.time()
        while alive(ranks[0]) and time.time() - start < 120:
            time.sleep(0.2)
        waited = time.time() - start  # until rank 0 gave up
        proc.wait(timeout=180)  # torchrun gives the stopped rank 30 s after SIGTERM, then kills it
        stderr = (tmp_path / "stderr").read_text()
    finally:
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
    assert proc.returncode != 0
    assert "rank 0: another rank did not answer within dist.timeout_s=8 s" in stderr, stderr[-3000:]
    assert 8 <= waited < 8 + 10  # the configured timeout, not the 30-minute default


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
