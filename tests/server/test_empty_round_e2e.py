"""A Poisson-sampled round can pick nobody (each device joins independently).
The run must go on: no messages, and under user-level DP the noised aggregate is
still released and accounted, because the mechanism does not depend on who joined."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from fl.config import compose
from fl.tracking import keys as K
from server.simulation import simulate

pytestmark = pytest.mark.slow


def _seed_whose_first_round_samples_nobody(devices: int, panel: int, q: float) -> int:
    """Mirror of RoundLoop's draws: the evaluation panel (``choice``), then one
    uniform per eligible device per round (``random``)."""
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        rng.choice(devices, panel, replace=False)
        if (rng.random(devices) >= q).all():
            return seed
    raise AssertionError("no such seed below 1000")


def test_a_round_that_samples_nobody_is_released_and_the_run_goes_on(tiny_overrides, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seed = _seed_whose_first_round_samples_nobody(devices=3, panel=2, q=1 / 3)
    overrides = [o for o in tiny_overrides if not o.startswith(("fleet.rounds",
                                                                 "fleet.devices_per_round"))]
    cfg = compose([*overrides, "fleet.rounds=2", "fleet.devices_per_round=1",
                   "fleet.sampling=poisson", "privacy=photo_user", f"seed={seed}",
                   f"tracking.uri={uri}", "tracking.samples_every=0"])
    summary = simulate(cfg)
    client = mlflow.MlflowClient(uri)
    assert client.get_run(summary.run_id).info.status == "FINISHED"

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(summary.run_id, key)}

    assert history(K.DEVICES_SAMPLED)[1] == 0 and history(K.DEVICES_TRAINED)[1] == 0
    user_eps = history(K.USER_EPS)
    assert 0 < user_eps[1] < user_eps[2]  # the empty round's release is accounted
