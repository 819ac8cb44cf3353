"""``fleet.backend=pool`` runs the same ServerApp loop and ClientApp as Flower's
engine: the same seeded run gives the same numbers on both, and what a device
keeps between messages (its ``Context``: SecAgg+'s secrets between stages)
survives the trip to a worker process and back."""

from __future__ import annotations

import math

import pytest

from fl.config import compose
from fl.tracking import keys as K
from server.simulation import simulate

pytestmark = pytest.mark.slow


def _run(tiny_overrides, tmp_path, backend: str, *extra: str):
    cfg = compose([*tiny_overrides, f"tracking.uri=sqlite:///{tmp_path / backend / 'mlflow.db'}",
                   f"devices.storage_dir={tmp_path / backend / 'devices'}",
                   f"checkpoint.dir={tmp_path / backend / 'ckpt'}", "tracking.samples_every=0",
                   f"fleet.backend={backend}", *extra])
    return simulate(cfg).history


def test_the_pool_and_flowers_engine_give_the_same_seeded_run(tiny_overrides, tmp_path):
    """Photo and user-level DP, seeded: every device's update is a function of the
    round and the device, whichever process trains it, so the released model, the
    evaluation and the accounting match round by round (to float rounding: the
    replies may be summed in another order)."""
    ray, pool = (_run(tiny_overrides, tmp_path, b) for b in ("ray", "pool"))
    assert sorted(ray) == sorted(pool) == [0, 1, 2]
    keys = [K.TRAIN_LOSS, K.DEVICES_TRAINED, K.PHOTO_EPS_MAX, K.USER_EPS]
    keys += [k for k in ray[2] if k.startswith("quality/")]
    for rnd in (1, 2):
        assert ray[rnd][K.DEVICES_TRAINED] == 3
        for key in keys:
            assert key in ray[rnd] and key in pool[rnd], key
            a, b = ray[rnd][key], pool[rnd][key]
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), (rnd, key, a, b)


def test_secure_aggregation_keeps_each_devices_secrets_across_the_pool(tiny_overrides,
                                                                       tmp_path):
    """SecAgg+ keeps a device's keys in its Context from the set-up stage to the
    unmasking: a pool that lost the Context between workers would abandon rounds."""
    history = _run(tiny_overrides, tmp_path, "pool", "aggregation.secure=true")
    for rnd in (1, 2):
        assert history[rnd][K.DEVICES_TRAINED] == 3
        assert history[rnd][K.SECAGG_ABANDONED] == 0
