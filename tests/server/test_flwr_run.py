"""`flwr run .` drives the same ServerApp/ClientApp, and stops what it starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from experiments.flwr_local import superlink_pids
from fl.tracking import keys as K

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_flwr_run_completes_and_leaves_no_superlink(tiny_overrides, tmp_path):
    home = tmp_path / "flwr-home"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides if not o.startswith("fleet.rounds")]
    overrides += ["fleet.rounds=1", f"tracking.uri={uri}"]
    done = subprocess.run(
        [sys.executable, "-m", "experiments.flwr_local", *overrides],
        check=False, cwd=REPO, env={**os.environ, "FLWR_HOME": str(home)},
        capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stopped local SuperLink" in done.stdout
    assert superlink_pids(home) == []
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fedface").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics[K.DEVICES_TRAINED] == 3
    assert K.SWAP_PSNR in runs[0].data.metrics
