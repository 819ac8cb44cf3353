"""The researcher's entry point: `python -m experiments.train [overrides] [-m]`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from fl.tracking import keys as K

REPO = Path(__file__).resolve().parents[1]


def _train(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], check=False,
                          cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_invalid_value_fails_before_training_naming_the_key(tmp_path):
    done = _train(["fleet.devices_per_round=500", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert done.returncode == 2
    assert "fleet.devices_per_round=500 is invalid" in done.stderr
    assert "round" not in done.stdout and "pretraining" not in done.stdout


@pytest.mark.slow
def test_multirun_sweep_runs_one_mlflow_run_per_job(tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides if not o.startswith("fleet.rounds")]
    done = _train(["-m", *overrides, "fleet.rounds=1", f"tracking.uri={uri}",
                   "privacy.photo.noise_multiplier=0.8,1.5",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}"], timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fedface").experiment_id])
    by_noise = {r.data.params["privacy.photo.noise_multiplier"]: r for r in runs}
    assert set(by_noise) == {"0.8", "1.5"}
    assert all(r.info.status == "FINISHED" for r in runs)
    eps = {k: r.data.metrics[K.PHOTO_EPS_MAX] for k, r in by_noise.items()}
    assert eps["0.8"] > eps["1.5"] > 0  # more noise, less privacy spent
