"""recog.dist with a real 2-process gloo group started by torchrun, and without torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recog import dist

HERE = Path(__file__).parent


def test_setup_without_torchrun_is_a_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = dist.setup()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert dist.run_on_rank0(lambda: 42, ctx, "x") == 42
    dist.teardown()


@pytest.mark.slow
def test_collectives_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent}:{HERE}"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(HERE / "dist_checks.py"), str(tmp_path)], check=True, env=env, timeout=120)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert (rep["rank"], rep["world_size"], rep["backend"]) == (r, 2, "gloo")
        assert rep["received"] == [10.0, 11.0, 12.0, 13.0]  # rank 1 got rank 0's result ...
        # ... and rank 0's error, instead of waiting forever: its own on rank 0, a sentence naming it on rank 1
        assert rep["error"] == ("FileNotFoundError: no such file" if r == 0 else "ConfigError: reading weights failed "
                                "on rank 0 (FileNotFoundError: no such file); see its traceback above.")
        assert rep["together"] == "only rank 1 sees this; fix it."  # rank 0 says rank 1's sentence
        assert rep["running_mean_after_broadcast"] == [1.0, 1.0, 1.0]
        assert rep["sum_of_ranks"] == 1.0
        assert rep["gather_equals_global"] and rep["grad_max_diff"] < 1e-12
        assert rep["gathered_uneven"] == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0]  # each row once, in rank order
        # 4 accumulated micro-batches (all-reduce on the last only) = one step on the 4x batch, up to rounding
        assert rep["accumulation_max_diff"] < 1e-6
        # [stop, minutes up] as each call returned them: rank 0's flag of call 2 and rank 1's stop of call 4, one
        # call later, the same on both ranks
        assert rep["agreed"] == [[False, False]] * 3 + [[False, True], [False, False], [True, False]]
        # posting every 3 calls: rank 1's stop of call 3 goes out at call 4 and is read at call 5 (only the call
        # after a post says anything); rank 0's flag of call 2, between posts and lowered again, never goes out
        assert rep["agreed_gap"] == [[False, False]] * 5 + [[True, False]] + [[False, False]] * 2
    assert (tmp_path / "read-by-0").exists() and not (tmp_path / "read-by-1").exists()  # only rank 0 read


def test_gloo_and_nccl_errors_are_told_apart():
    """What recog turns into its one-sentence RankTimeout / PeerLost, from the texts gloo and NCCL raise."""
    from recog.dist import is_peer_lost, is_timeout

    assert is_timeout(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 8000ms "
                                   "for recv operation to complete"))
    assert is_timeout(RuntimeError("Application timeout caused pair closure"))  # the next op on that connection
    assert is_peer_lost(RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:1234"))
    assert not is_timeout(RuntimeError("Connection closed by peer")) and not is_peer_lost(RuntimeError("nan loss"))
