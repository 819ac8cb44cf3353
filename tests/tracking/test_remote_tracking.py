"""``tracking.uri=http://host:port`` against a real ``mlflow server`` with a database
backend: a tiny experiment logs through HTTP, and the MLflow client reads it back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from experiments.deploy_demo import free_port, wait_for_port
from fl.config import compose
from fl.tracking import keys as K
from server.simulation import simulate

pytestmark = pytest.mark.slow


@pytest.fixture()
def mlflow_server(tmp_path):
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine: uvicorn's graceful stop
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)


def test_a_run_logs_to_a_remote_mlflow_server(mlflow_server, tiny_overrides, tmp_path,
                                              monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in a local store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = simulate(compose([*tiny_overrides, "fleet.rounds=1", "privacy=photo",
                                f"tracking.uri={mlflow_server}",
                                "tracking.experiment_name=remote"]))
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics[K.SWAP_PSNR] == pytest.approx(summary.final(K.SWAP_PSNR))
    assert [m.step for m in client.get_metric_history(summary.run_id, K.SWAP_PSNR)] == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"config", "model", "privacy"} <= artifacts  # uploaded through the server
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
