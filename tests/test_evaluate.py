"""python -m recog.evaluate: two ranks, each searching its own slice of the queries, give the figures of one."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from identify_setup import write_embeddings
from test_retrieval import clustered

from recog.retrieval import retrieval_metrics


def embeddings(folder, vectors, labels, part_size, sha="a" * 64):
    return write_embeddings(folder, vectors.numpy(), part_size, sha, classes=7, labels=labels.numpy())


def evaluate(*args, nproc=None):
    torchrun = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([sys.executable, *torchrun, "-m", "recog.evaluate", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})


@pytest.mark.slow
def test_two_ranks_give_the_figures_of_one_process(tmp_path):
    queries, q_labels = clustered(301, 7, seed=1)
    gallery, g_labels = clustered(1000, 7, seed=2)
    q = embeddings(tmp_path / "q", queries, q_labels, 100)
    g = embeddings(tmp_path / "g", gallery, g_labels, 600)
    for args, want in (((q, g), retrieval_metrics(queries, q_labels, gallery, g_labels)),
                       ((q,), retrieval_metrics(queries, q_labels))):  # leave-one-out
        one, two = evaluate(*args, "--chunk", "64"), evaluate(*args, nproc=2)
        assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
        got_one, got_two = json.loads(one.stdout), json.loads(two.stdout.strip().splitlines()[-1])
        assert got_one.pop("queries") == got_two.pop("queries") == 301
        assert got_one == pytest.approx(want, abs=1e-6) and got_two == pytest.approx(want, abs=1e-6)


def test_embeddings_of_different_models_are_refused_in_one_sentence(tmp_path):
    vectors, labels = clustered(20, 7)
    q = embeddings(tmp_path / "q", vectors, labels, 20)
    g = embeddings(tmp_path / "g", vectors, labels, 20, sha="b" * 64)
    result = evaluate(q, g)
    assert result.returncode == 2 and "embedded by different models" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
