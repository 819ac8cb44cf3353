"""`experiment=optuna_privacy`: Optuna searches the recipe at a fixed privacy budget,
each trial a child of one MLflow sweep run (needs the `optuna` extra)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from fl.tracking import keys as K
from fl.tracking.mlflow_run import OBJECTIVE_TAG
from fl.tracking.sweep import OVERRIDES_TAG, ROLE_TAG, SWEEP_ID_TAG

REPO = Path(__file__).resolve().parents[1]
SEARCHED = {"local.lr_shared", "local.lr_personal", "privacy.photo.max_grad_norm",
            "privacy.user.clip", "local.epochs"}
TARGET = 4.0  # the experiment's fixed budget, both units


@pytest.mark.slow
def test_optuna_searches_the_recipe_at_a_fixed_budget_one_child_run_per_trial(tiny_overrides,
                                                                              tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                        reason="the optuna extra: pip install -e '.[optuna]'")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a key given on the command line is fixed, not searched: leave local.epochs to Optuna
    overrides = [o for o in tiny_overrides if not o.startswith(("fleet.rounds", "local.epochs"))]
    sweep_dir = tmp_path / "multirun"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.train", "-m", "experiment=optuna_privacy",
         *overrides, "fleet.rounds=1", f"tracking.uri={uri}", "tracking.samples_every=0",
         "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna" and set(result["best_params"]) == SEARCHED
    assert math.isfinite(result["best_value"])

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("fedface-optuna-privacy")  # from the config
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "job"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    objectives = []
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags[SWEEP_ID_TAG] == parent.data.tags[SWEEP_ID_TAG]
        # each trial is one point of the search space...
        assert all(f"{key}=" in child.data.tags[OVERRIDES_TAG] for key in SEARCHED)
        # ...at the same budget: noise calibrated to the fixed targets
        metrics = child.data.metrics
        assert 0 < metrics[K.PHOTO_EPS_MAX] <= TARGET + 1e-6
        assert 0 < metrics[K.USER_EPS] <= TARGET + 1e-6
        objectives.append(metrics[child.data.tags[OBJECTIVE_TAG]])
    # Optuna's best is the best child's objective (what experiments.train returned)
    assert result["best_value"] == pytest.approx(max(objectives))
