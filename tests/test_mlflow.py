"""logger=mlflow against a real `mlflow server` on loopback (sqlite store, local artefact root): params, metrics at
each log step and epoch, metrics.json and model.json read back with MLflow's client; a server that does not answer,
and mlflow not installed, are one sentence before training."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import recog_frames, run_train, tiny_args

from recog.errors import ConfigError
from recog.mlflow_log import INSTALL, check_logger, flatten, mlflow_key
from recog.rundir import compose_train_config

mlflow = pytest.importorskip("mlflow")

SERVER_START_S = 180  # a busy machine: the server imports MLflow and migrates its sqlite store first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1, its URI; stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server",
                             "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
                             "--default-artifact-root", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                                       ) from None
                time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, 15)  # the server and its gunicorn/uvicorn workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_a_run_logs_params_metrics_and_artefacts_to_a_real_server(server, tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    args = tiny_args(tiny_data, epochs=2, batch_size=64, log_every=2, **{"model.width": 8}) + [
        "logger=mlflow", f"logger.tracking_uri={server}", "logger.experiment=watch-test", f"hydra.run.dir={run_dir}"]
    result = run_train(args, cwd=tmp_path, nproc=2, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run_dir / "tb").is_dir()  # TensorBoard is written too

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("watch-test")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.lr"] == "0.006" and run.data.params["logger.name"] == "mlflow"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == [2, 4, 6, 8, 10, 12, 14, 16]  # each log step (8 steps an epoch)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/top1")] == [8, 16]  # each epoch
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/epoch_loss")] == [8, 16]
    top5 = client.get_metric_history(run.info.run_id, "eval/top5")
    assert top5[-1].value == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["top5"])

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"metrics.json", "model.json"}
    local = client.download_artifacts(run.info.run_id, "model.json", str(tmp_path))
    model = json.loads(Path(local).read_text())
    assert model["num_classes"] == 10 and model["backbone"] == "convnet"
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id


def test_a_server_that_does_not_answer_is_one_sentence_before_training(tiny_data, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    result = run_train(tiny_args(tiny_data) + ["logger=mlflow", f"logger.tracking_uri={uri}"], cwd=tmp_path,
                       nproc=None, timeout=120)
    assert result.returncode != 0
    assert f"logger.tracking_uri={uri}: no MLflow tracking server answers there" in result.stderr, result.stderr
    assert "logger=tensorboard" in result.stderr and not recog_frames(result.stderr)
    assert "step 1" not in result.stdout and not list(tmp_path.rglob("*.pt"))  # nothing trained


def test_a_server_that_refuses_requests_is_one_sentence_before_training(monkeypatch):
    """A real HTTP server on loopback that answers every request 401 (a tracking server behind authentication, no
    credentials given): /health answers, MLflow's first real request is refused: one sentence, not a traceback on
    rank 0 after the process group exists."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def refuse(self):
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = refuse

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{httpd.server_address[1]}"
        monkeypatch.delenv("RANK", raising=False)
        with pytest.raises(ConfigError, match="MLflow's first request failed") as caught:
            check_logger(compose_train_config("logger=mlflow", f"logger.tracking_uri={uri}"))
        assert uri in str(caught.value) and "logger=tensorboard" in str(caught.value)
        assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the check's quick settings put back
        monkeypatch.setenv("RANK", "1")  # another rank: it does not log, it makes no request
        check_logger(compose_train_config("logger=mlflow", f"logger.tracking_uri={uri}"))
    finally:
        httpd.shutdown()


def test_mlflow_missing_is_one_sentence_naming_the_extra(monkeypatch):
    cfg = compose_train_config("logger=mlflow")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without the package imports
    with pytest.raises(ConfigError, match=INSTALL.replace("[", r"\[").replace("]", r"\]")):
        check_logger(cfg)
    check_logger(compose_train_config())  # logger=tensorboard: nothing to check


def test_names_mlflow_would_refuse_are_made_acceptable():
    from mlflow.utils.validation import _validate_metric_name

    for tag, key in (("eval_class/T-shirt/top", "eval_class/T-shirt/top"), ("eval/top1", "eval/top1"),
                     ("eval_class/Café & Bar (new)", "eval_class/Café _ Bar _new_"), ("eval_class/..", "eval_class/__"),
                     ("eval_class/a//b/", "eval_class/a/_/b/_")):
        assert mlflow_key(tag) == key
        _validate_metric_name(key)  # MLflow's own check


def test_params_are_the_config_flattened():
    assert flatten({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 0, "empty": {}}) == {
        "optim.lr": "0.1", "optim.betas": "[0.9, 0.99]", "seed": "0", "empty": "{}"}
