"""What a training rank imports before its first step: only what it uses (bench/startup.py times the start)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imported by nothing a rank other than 0 runs on the default job: TensorBoard (rank 0's writer imports it),
# and the optional packages of other features (faiss: indexes; timm: timm backbones; mlflow: logger=mlflow;
# the serving and peer-benchmark libraries).
NOT_AT_IMPORT = ("tensorboard", "boto3", "faiss", "timm", "mlflow", "litserve", "lightning", "accelerate")


def test_train_imports_no_optional_package():
    code = ("import sys; import train; import recog.train; "
            f"print(' '.join(m for m in {NOT_AT_IMPORT!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         cwd=ROOT)
    assert out.stdout.split() == [], f"importing train.py and recog.train imported {out.stdout.split()}"


def test_rank_zero_writer_still_writes_tensorboard(tmp_path):
    from recog.log import make_writer

    writer = make_writer(tmp_path, is_main=True)
    writer.add_scalar("train/loss", 1.0, 1)
    writer.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


FORKED_SERVER = """
import os, threading, time
import torch
from torch.utils.data import BatchSampler, SequentialSampler, TensorDataset
from recog.data import loader

if {thread}:
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
forked = loader.fork_worker_server()
data = TensorDataset(torch.arange(12))
batches = loader.make_loader(data, 1, False, batch_sampler=BatchSampler(SequentialSampler(data), 4, False))
print(forked, [b[0].tolist() for b in batches])
server = loader.multiprocessing.forkserver._forkserver._forkserver_pid  # the workers' (started by then)
print(open(f"/proc/{{server}}/cmdline", "rb").read() == open("/proc/self/cmdline", "rb").read())
del batches  # its persistent worker ends with it (it ignores the SIGTERM of Python's exit: see start_data_worker)
"""


def forked_server(thread: bool) -> list[str]:
    code = FORKED_SERVER.format(thread=thread)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()


def test_the_worker_server_forked_from_the_training_process_serves_its_workers():
    """train.py forks the data-loader workers' server at its start (no second interpreter importing torch): the
    workers come from it, a copy of this process, and read the data as from a fresh server."""
    assert forked_server(thread=False) == ["True [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]", "True"]


def test_with_another_thread_running_the_server_starts_as_before():
    """A fork copies no thread, and a lock another thread holds stays locked in the copy: then no fork, but
    multiprocessing's own server (a fresh interpreter), with the same batches."""
    assert forked_server(thread=True) == ["False [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]", "False"]
