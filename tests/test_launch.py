"""Launching: two real hosts (network namespaces), srun-style start, Hydra multirun under torchrun,
and the SLURM / Kubernetes / submitit files users edit."""

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_train, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recog.checkpoint import load_checkpoint
from recog.dist import first_host, slurm_launch_env

# --- SLURM's environment (pure) ---

@pytest.mark.parametrize("nodelist,first", [
    ("node17", "node17"), ("gpu[07-09,12],cpu3", "gpu07"), ("a1,b2", "a1"), ("gpu-[3-4]-ib", "gpu-3-ib"),
    ("n[1-2],m[3-4]", "n1"), ("rack2-[001-128]", "rack2-001"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_slurm_variables_become_torchruns():
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NNODES": "2",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    assert slurm_launch_env(slurm) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                                       "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}
    # torchrun inside a SLURM job wins; a batch script (one task) is a single process; MASTER_* may be given
    assert slurm_launch_env({**slurm, "WORLD_SIZE": "16", "RANK": "3"}) == {}
    assert slurm_launch_env({**slurm, "SLURM_NTASKS": "1"}) == {}
    assert slurm_launch_env({**slurm, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "29400"})["MASTER_ADDR"] == "10.1.1.1"
    assert slurm_launch_env({}) == {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same_weights(a: Path, b: Path) -> list[str]:
    """Names of the parameters/buffers that differ between two checkpoints (empty: identical)."""
    x, y = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert x.keys() == y.keys()
    return [k for k in x if not torch.equal(x[k], y[k])]


@pytest.fixture(scope="module")
def torchrun_reference(tiny_data, tmp_path_factory) -> Path:
    """2 epochs with torchrun on one host: what the srun-style and the two-host runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_train(tiny_args(tiny_data, epochs=2) + [f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir / "checkpoints" / "last.pt"


@pytest.mark.slow
def test_srun_style_start_from_slurm_variables(tiny_data, tmp_path, torchrun_reference):
    """Two `python train.py` processes with only SLURM's variables, as `srun --ntasks=2` would start them."""
    port = free_port()
    job_id = port - 20000 if port >= 20000 else port + 20000  # so that 20000 + id % 20000 is this free port
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                   SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id))
        out = open(tmp_path / f"task{rank}.out", "w")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py")] + tiny_args(tiny_data, epochs=2),
                                      cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
    outputs = [(tmp_path / f"task{r}.out").read_text() for r in range(2)]
    assert codes == [0, 0], outputs
    assert "world size 2 (gloo on cpu)" in outputs[0] and "config:" not in outputs[1]  # rank 1 stays quiet
    run_dir = tmp_path / "outputs" / f"job-{job_id}"  # both tasks agreed on the directory: named after the job
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2
    assert same_weights(run_dir / "checkpoints" / "last.pt", torchrun_reference) == []


@pytest.mark.slow
def test_multirun_of_distributed_jobs_with_a_summary(tiny_data, tmp_path):
    result = run_train(["-m"] + tiny_args(tiny_data, epochs=1) + ["seed=1,2"], cwd=tmp_path, nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    sweeps = list((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps  # both ranks, both jobs: one sweep directory
    sweep = sweeps[0]
    for job, seed in (("0", 1), ("1", 2)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["step"] == 16
        assert load_checkpoint(sweep / job / "checkpoints" / "last.pt")["config"]["seed"] == seed
        events = EventAccumulator(str(sweep / job / "tb"))
        events.Reload()
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
        assert b"seed" in events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    # two different seeds trained two different models
    assert same_weights(sweep / "0" / "checkpoints" / "last.pt", sweep / "1" / "checkpoints" / "last.pt")
    summary = (sweep / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(rows) == 2 and "| seed |" in summary, summary
    top1 = [json.loads((sweep / j / "metrics.json").read_text())["top1"] for j in ("0", "1")]
    assert f"| 0 | 1 | {top1[0]:.4f} |" in summary and f"| 1 | 2 | {top1[1]:.4f} |" in summary, summary
    assert (sweep / "summary.csv").read_text().splitlines()[0].startswith("job,seed,top1")
    assert summary in result.stdout  # printed once, by rank 0
    assert result.stdout.count("# Sweep") == 1


def netns_available() -> str | None:
    """None if network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    probe = f"recog-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"`ip netns add` failed: {made.stderr.strip()}"


@pytest.mark.slow
def test_two_hosts_in_network_namespaces(tiny_data, tmp_path, torchrun_reference):
    """Two network namespaces joined by a veth pair: two hosts with their own addresses. One torchrun agent
    in each (--nnodes=2 --nproc_per_node=1), c10d rendezvous on the first host's address."""
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    hosts = [(f"recog-{tag}-a", f"rva{tag}", "10.231.7.1"), (f"recog-{tag}-b", f"rvb{tag}", "10.231.7.2")]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        for ns, _, _ in hosts:
            ip("netns", "add", ns)
        ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, dev, addr in hosts:
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        procs = []
        for ns, dev, addr in hosts:
            # GLOO_SOCKET_IFNAME: the interface the hosts share (left alone, gloo would bind the address its
            # host name resolves to, which the other host cannot reach; the setting users most often miss)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": dev}
            # --local-addr: the address the other host reaches this one at (torchrun would otherwise hand out
            # the machine's host name, which resolves outside the namespaces); --rdzv-conf=is_host=1: the first
            # host serves the rendezvous (torchrun decides that by matching its host name to the endpoint)
            first = ns == hosts[0][0]
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={hosts[0][2]}:29500",
                   f"--local-addr={addr}", *(["--rdzv-conf=is_host=1"] if first else []),
                   f"--rdzv-id=twohost-{tag}", str(ROOT / "train.py"),
                   *tiny_args(tiny_data, epochs=2), f"hydra.run.dir={tmp_path / 'run'}"]
            out = open(tmp_path / f"{ns}.out", "w")
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=300) for p in procs]
        outputs = [(tmp_path / f"{ns}.out").read_text() for ns, _, _ in hosts]
        assert codes == [0, 0], "\n\n".join(outputs)
    finally:
        for p in locals().get("procs", []):
            p.kill()
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "world size 2 (gloo on cpu)" in log
    # the same job as torchrun's 2 processes on one host: the same weights, bit for bit
    assert same_weights(tmp_path / "run" / "checkpoints" / "last.pt", torchrun_reference) == []


# --- the files users edit ---

def test_launch_scripts_parse():
    for script in ("launch/slurm.sbatch", "launch/torchrun_multinode.sh"):
        result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)
    sbatch = (ROOT / "launch" / "slurm.sbatch").read_text()
    directives = [line.split()[1] for line in sbatch.splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in directives and any(d.startswith("--signal=B:USR1@") for d in directives)
    assert "--ntasks-per-node=1" in directives  # one torchrun agent per node
    for needed in ("--rdzv-backend=c10d", "--rdzv-endpoint=", "--max-restarts=", "scontrol requeue",
                   "trap requeue USR1"):
        assert needed in sbatch, needed


def test_pytorchjob_manifest_has_what_the_operator_needs():
    job = yaml.safe_load((ROOT / "launch" / "pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for role in ("Master", "Worker"):
        pod = specs[role]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]  # the name the operator uses
        assert container["image"]
        command = container["command"] + container["args"]
        assert "torch.distributed.run" in command and "train.py" in command
        assert any(a.startswith("hydra.run.dir=") for a in command)  # one shared run directory
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == job["spec"]["nprocPerNode"]
        volumes = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for m in container["volumeMounts"]} <= volumes
        assert pod["terminationGracePeriodSeconds"] >= 30


def test_submitit_launcher_config_composes():
    from recog.rundir import compose_train_config

    cfg = compose_train_config("hydra/launcher=slurm", "hydra.launcher.nodes=4", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.nodes == 4 and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.max_num_timeout > 0  # requeued at the time limit
    assert cfg.hydra.callbacks.sweep_summary._target_ == "recog.sweep.SweepSummary"
