"""logger=mlflow: the run in an MLflow tracking server, beside TensorBoard (rank 0 only).

Params: the resolved config, flattened (`optim.lr`, ...). Metrics: every scalar TensorBoard gets, at its step,
sent in batches (one request per logged step, not one per scalar). Artefacts: metrics.json and model.json at the
end. A resumed run (the same run directory) continues its MLflow run: its id is kept in run_dir/mlflow_run.json.

`check_logger` runs on every rank before any process group exists: mlflow not installed, or a tracking server
that does not answer, is one sentence before training starts; rank 0, which logs, also makes one real request
(listing an experiment: a server behind authentication that refuses it is that sentence too). Should starting the
run fail after all, rank 0 warns and trains on with TensorBoard alone (the other ranks never wait on MLflow).
During the run, requests go out from a thread of their own, so training never waits for the server (nor for
MLflow's retries, minutes of them by default); one that fails is a warning, once, and the run goes on with
TensorBoard alone: a tracking server never stops training.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from recog.errors import ConfigError
from recog.files import write_json

log = logging.getLogger("recog")

INSTALL = "pip install 'recog[mlflow]'"
CHECK_TIMEOUT_S = 10  # how long the start waits for the tracking server's /health (and its one request)
MAX_BATCH = 100  # metrics and params per request (MLflow's log_batch takes up to 1,000 metrics and 100 params)
CLOSE_WAIT_S = 120  # at the end, how long the run waits for the requests still queued (a server slow to answer)


def tracking_uri(logger) -> str | None:
    """logger.tracking_uri, else MLFLOW_TRACKING_URI, else None (MLflow's default: a local store)."""
    return logger.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_logger(cfg) -> None:
    """logger=mlflow: the package is there, and an http(s) tracking URI answers. One sentence otherwise."""
    logger = cfg.get("logger")
    if logger is None or logger.get("name") != "mlflow":
        return
    if importlib.util.find_spec("mlflow") is None:  # found, not imported: every rank checks, rank 0 alone uses it
        raise ConfigError(f"logger=mlflow needs the mlflow package, which is not installed: {INSTALL} "
                          "(or logger=tensorboard to train without it).")
    uri = tracking_uri(logger)
    if uri and uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CHECK_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # something answered (a server behind authentication, a proxy): the real request below decides
        except (OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(f"logger.tracking_uri={uri}: no MLflow tracking server answers there ({reason}); "
                              "start it (mlflow server --host HOST --port PORT), give logger.tracking_uri (or "
                              "MLFLOW_TRACKING_URI) a server that answers, or train without it: logger=tensorboard."
                              ) from None
    if os.environ.get("RANK", "0") == "0":  # the rank that logs: one real request, as the run will make them
        try:
            with quick_requests():
                from mlflow.tracking import MlflowClient

                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as error:  # noqa: BLE001 (MlflowException, requests' errors: all one sentence here)
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"logger.tracking_uri={uri or '(MLflow default)'}: MLflow's first request failed "
                              f"({first}); give logger.tracking_uri (or MLFLOW_TRACKING_URI) a tracking server this "
                              "process may write to (credentials: MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN), or "
                              "train without it: logger=tensorboard.") from None


class quick_requests:
    """MLflow's HTTP requests without its retries (minutes of them by default) and with CHECK_TIMEOUT_S each, for
    the duration of a `with`: a check answers at once."""

    SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT_S)}

    def __enter__(self):
        self.saved = {key: os.environ.get(key) for key in self.SETTINGS}
        os.environ.update(self.SETTINGS)

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def mlflow_key(name: str) -> str:
    """A metric's or param's name as MLflow takes it: letters, digits and `_-. :` between slashes, no empty, `.` or
    `..` part (a class name in `eval_class/NAME` may hold anything); the rest become `_`."""
    parts = [re.sub(r"[^\w.\- :]", "_", part) for part in name.split("/")]
    return "/".join(part if part.strip(".") else part.replace(".", "_") or "_" for part in parts)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": "0.1"}: MLflow's params."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]  # MLflow's limit on a param's value
    return out


class MlflowLog:
    """One MLflow run: `add_scalar` as TensorBoard's, `log_artifacts`, `close`. Rank 0 only."""

    def __init__(self, logger, run_dir: Path, config: dict):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(logger)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.pending, self.working, self.finished = [], True, False
        self.requests: queue.Queue = queue.Queue()  # (what, action); None: the end
        self.sender = threading.Thread(target=self.send, name="mlflow", daemon=True)
        try:  # checked before training (check_logger); should it fail now, a warning: never rank 0 alone stopping
            self.start(logger, run_dir, config)
        except Exception as error:  # noqa: BLE001 (MlflowException, requests' errors, OSError: all the same here)
            self.working = False
            log.warning("MLflow at %s: the run could not be started (%s); training goes on, logging to TensorBoard "
                        "only", self.uri, str(error).splitlines()[0] if str(error) else type(error).__name__)
        self.sender.start()

    def start(self, logger, run_dir: Path, config: dict) -> None:
        """The MLflow run this directory logs to: the interrupted one's, or a new one with the config's params."""
        saved = run_dir / "mlflow_run.json"
        self.run_id = self.resumed_run(saved)
        if self.run_id is None:
            name = logger.get("experiment") or "recog"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=logger.get("run_name") or run_dir.name,
                                         tags={"recog.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            write_json({"tracking_uri": self.uri, "run_id": self.run_id}, saved)
            self.log_params(flatten(config))
            log.info("MLflow: run %s in experiment %r at %s", self.run_id, name, self.uri or "MLflow's default store")

    def resumed_run(self, saved: Path) -> str | None:
        """The MLflow run an interrupted run in this directory logged to, if it is on this tracking URI."""
        if not saved.exists():
            return None
        kept = json.loads(saved.read_text())
        if kept.get("tracking_uri") != self.uri:
            return None
        self.client.update_run(kept["run_id"], status="RUNNING")
        log.info("MLflow: continuing run %s at %s", kept["run_id"], self.uri or "MLflow's default store")
        return kept["run_id"]

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(key), value) for key, value in params.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.call("log params", lambda part=items[i:i + MAX_BATCH]: self.client.log_batch(self.run_id,
                                                                                             params=part))

    def add_scalar(self, tag: str, value, step: int) -> None:
        from mlflow.entities import Metric

        if self.pending and (self.pending[-1].step != step or len(self.pending) >= MAX_BATCH):
            self.flush()  # a new step: the last step's scalars in one request
        self.pending.append(Metric(mlflow_key(tag), float(value), int(time.time() * 1000), int(step)))

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if pending:
            self.call("log metrics", lambda: self.client.log_batch(self.run_id, metrics=pending))

    def log_artifacts(self, paths: list[Path]) -> None:
        self.flush()
        for path in paths:
            self.call(f"log {Path(path).name}", lambda p=path: self.client.log_artifact(self.run_id, str(p)))
        self.finished = True

    def close(self) -> None:
        """The run ends FINISHED once its artefacts were logged, KILLED otherwise (stopped by a signal)."""
        self.flush()
        status = "FINISHED" if self.finished else "KILLED"
        self.call("end the run", lambda: self.client.set_terminated(self.run_id, status))
        self.requests.put(None)
        self.sender.join(timeout=CLOSE_WAIT_S)
        if self.sender.is_alive():
            log.warning("MLflow at %s: still sending after %d s; the run's last figures may be missing there",
                        self.uri, CLOSE_WAIT_S)

    def call(self, what: str, action) -> None:
        """`action` (a request), sent from the sender thread in order."""
        self.requests.put((what, action))

    def send(self) -> None:
        while (request := self.requests.get()) is not None:
            if self.working:
                self.attempt(*request)

    def attempt(self, what: str, action) -> None:
        try:
            action()
        except Exception as error:  # noqa: BLE001 (MlflowException, requests' errors, OSError: all the same here)
            self.working = False
            log.warning("MLflow at %s failed to %s (%s); the run goes on, logging to TensorBoard only",
                        self.uri, what, str(error).splitlines()[0] if str(error) else type(error).__name__)
