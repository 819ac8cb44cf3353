"""The researcher's entry point: `python -m experiments.train [overrides] [-m]`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from fl.tracking import keys as K
from fl.tracking.sweep import OVERRIDES_TAG, ROLE_TAG, SWEEP_ID_TAG

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
def test_a_named_sweep_is_one_parent_run_with_a_child_per_job_and_a_report(tiny_overrides,
                                                                            tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides if not o.startswith("fleet.rounds")]
    sweep_dir = tmp_path / "multirun"
    done = _train(["-m", "experiment=privacy_utility", *overrides, "fleet.rounds=1",
                   f"tracking.uri={uri}", "tracking.samples_every=0",
                   "privacy.photo.target_epsilon=2.0,8.0", f"hydra.sweep.dir={sweep_dir}"],
                  timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("fedface-privacy-utility")  # from the config
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "job"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    sweep_id = parent.data.tags[SWEEP_ID_TAG]
    assert parent.info.status == "FINISHED"
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags[SWEEP_ID_TAG] == sweep_id
        assert child.info.status == "FINISHED"
    by_target = {r.data.tags[OVERRIDES_TAG]: r.data.metrics for r in children}
    low = next(m for o, m in by_target.items() if "target_epsilon=2.0" in o)
    high = next(m for o, m in by_target.items() if "target_epsilon=8.0" in o)
    # noise calibrated per job: each spends at most its target, the looser one more
    assert 0 < low[K.PHOTO_EPS_MAX] <= 2.0 + 1e-6 and low[K.USER_EPS] <= 2.0 + 1e-6
    assert low[K.PHOTO_EPS_MAX] < high[K.PHOTO_EPS_MAX] <= 8.0 + 1e-6
    # the multirun's callback wrote the report locally and to the parent run
    assert (sweep_dir / "report" / "sweep.md").is_file()
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report/sweep.md", "report/frontier.png"}

    report = subprocess.run([sys.executable, "-m", "experiments.report", sweep_id,
                             "--tracking-uri", uri, "--out", str(tmp_path / "again")],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    table = (tmp_path / "again" / "sweep.md").read_text()
    assert table.count("privacy.photo.target_epsilon=") == 2
    assert f"{low[K.PHOTO_EPS_MAX]:.3f}" in table and f"{high[K.USER_EPS]:.3f}" in table
    assert (tmp_path / "again" / "frontier.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "experiments.report", "nosuchsweep",
                          "--tracking-uri", uri], check=False, cwd=REPO, capture_output=True,
                         text=True,
                         timeout=120)
    assert bad.returncode == 2 and "neither a sweep id nor" in bad.stderr
