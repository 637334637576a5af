"""Tracking: the in-memory tracker, MLflow on the default SQLite store and on a real ``mlflow server``."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from vitbn.bench.system import cpu_features, cpu_model
from vitbn.config import DataConfig, RunConfig, TrackConfig, flatten
from vitbn.data import prepare_data
from vitbn.engine import fit, load_model
from vitbn.errors import UserError
from vitbn.tracking import DEFAULT_TRACKING_URI, MemoryTracker, MLflowTracker, make_tracker
from waits import wait_s

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)
DATA = dict(train_subset=120, test_subset=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _server_process(tmp_path_factory):
    """Starts a real tracking server (proxied artifacts) when the module starts, so that it boots while the
    other tests run; ``mlflow_server`` waits for it."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--serve-artifacts",
           "--artifacts-destination", str(root / "art"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    log = (root / "server.log").open("w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    # its own process group: the server's uvicorn child is stopped with it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", root / "server.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(_server_process) -> str:
    """The server's URI once ``/health`` answers (up to 60 s times $VITBN_TEST_TIME_FACTOR)."""
    proc, uri, log = _server_process
    deadline = time.monotonic() + wait_s(60)
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return uri
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def data():
    return prepare_data(DataConfig(**DATA))


def make_config(tmp_path, **track) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name": "vit", **TINY},
        "data": DATA,
        "train": {"epochs": 1, "batch_size": 40, "lr": 1e-3, "device": "cpu", "threads": 1, "out_dir": str(tmp_path)},
        "track": {"run_name": "r", **track},
    })  # fmt: skip


def test_memory_tracker():
    t = MemoryTracker()
    rid = t.start_run("a", parent_id="p", tags={"x": 1})
    t.log_params({"lr": 0.1})
    t.log_metrics({"loss": 1.5}, step=1)
    t.log_metrics({"loss": 0.5}, step=2)
    t.end_run("KILLED")
    assert t.run.tags == {"mlflow.parentRunId": "p", "x": "1"} and t.run.params == {"lr": "0.1"}
    assert t.run.metrics["loss"] == [(1, 1.5), (2, 0.5)] and t.run.status == "KILLED"
    assert t.start_run(run_id=rid) == rid and t.run.status == "RUNNING" and len(t.runs) == 1
    child = t.start_run("child", parent_id=rid)
    t.end_run()
    assert t.runs[child].status == "FINISHED" and t.run.run_id == rid and t.run.status == "RUNNING"
    with pytest.raises(ValueError, match="status='DONE' is not one of"):
        t.end_run("DONE")


def test_unreachable_server_is_one_line_error(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=rf"^MLflow tracking server {uri} is not reachable \(.*\); start it"):
        make_tracker(TrackConfig(tracking_uri=uri))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UserError, match="is not reachable"):  # before any data is loaded or model built
        fit(make_config(tmp_path, tracking_uri=None, experiment="x"))
    with pytest.raises(UserError, match="folder .*missing does not exist"):
        make_tracker(TrackConfig(tracking_uri=f"sqlite:///{tmp_path}/missing/db.sqlite"))


def test_default_sqlite_store(tmp_path, monkeypatch, data):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = make_tracker(TrackConfig(experiment="local"))
    assert isinstance(tracker, MLflowTracker) and tracker.tracking_uri == DEFAULT_TRACKING_URI
    parent = tracker.start_run("sweep")
    result = fit(make_config(tmp_path, experiment="local"), tracker=tracker, parent_run_id=parent, data=data,
                 progress="none")  # fmt: skip
    assert tracker.run_id == parent  # the child ended: the parent is active again
    tracker.end_run()
    diverged_cfg = make_config(tmp_path, experiment="local", run_name="boom")
    diverged_cfg.train.optimizer, diverged_cfg.train.lr = "sgd", 1e6
    diverged = fit(diverged_cfg, data=data, progress="none")  # tracker from the config: the default store
    assert diverged.status == "diverged" and (tmp_path / "mlruns.db").is_file()

    client = MlflowClient(DEFAULT_TRACKING_URI)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).info.status == "FINISHED"
    assert run.data.tags["vitbn.status"] == "finished" and run.data.tags["device"] == "cpu"
    for key, value in result.history[0].items():
        if key != "epoch":
            (metric,) = client.get_metric_history(result.run_id, key)
            assert (metric.step, metric.value) == (1, pytest.approx(value, rel=1e-12, nan_ok=True)), key
    bad = client.get_run(diverged.run_id)
    assert bad.info.status == "FAILED" and bad.data.tags["vitbn.status"] == "diverged"
    assert math.isnan(client.get_metric_history(diverged.run_id, "train/loss")[0].value)


def test_training_against_a_tracking_server(tmp_path, mlflow_server, data):
    from mlflow import MlflowClient

    cfg = make_config(tmp_path, tracking_uri=mlflow_server, experiment="served")
    result = fit(cfg, data=data, progress="none")
    assert result.status == "finished"
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    expected = {k: str(v) for k, v in flatten(cfg.to_dict()).items() if k != "train.resume"}
    assert {k: run.data.params[k] for k in expected} == expected
    assert int(run.data.params["model.num_params"]) == sum(p.numel() for p in result.model.parameters())
    assert {"git_commit", "version.torch", "version.vitbn", "version.mlflow", "hostname", "threads"} <= set(
        run.data.tags
    )
    assert run.data.tags["machine"] == f"{cpu_model()} [{cpu_features()}] ({os.cpu_count()} logical cores visible)"
    assert run.data.tags["threads_choice"] == "requested" and run.data.tags["threads"] == "1"
    record = result.history[0]
    for key in ("train/loss", "train/acc", "test/loss", "test/acc", "test/acc_class_3", "time/train_epoch_s", "lr"):
        (metric,) = client.get_metric_history(result.run_id, key)
        assert metric.step == 1 and metric.value == pytest.approx(record[key], rel=1e-12)
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert names == {"config.yaml", "history.json", "history.csv", "model"}
    local = client.download_artifacts(result.run_id, "model/model.pt", str(tmp_path / "dl"))
    torch.testing.assert_close(load_model(local).state_dict(), result.model.state_dict())
