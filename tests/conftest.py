"""Shared fixtures: small real data, a tiny pretrained checkpoint, temp MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny import TINY_PHASES

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_overrides(tmp_path_factory) -> list[str]:
    """Hydra overrides for a fleet small enough to simulate in seconds."""
    cache = tmp_path_factory.mktemp("pretrain-cache")
    devices = tmp_path_factory.mktemp("devices")
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    return [
        "fleet.num_devices=3", "fleet.devices_per_round=3", "fleet.rounds=2",
        "fleet.eval_devices=2", "fleet.newuser_identities=1", "fleet.newuser_steps=3",
        "fleet.newuser_every=1", "data.num_public=8", "data.photos_min=10",
        "data.photos_max=12", "data.heldout_photos=3", "data.clip_length=3",
        "task.eval_clips=1", "task.width=8", "pretrain.steps=5", "pretrain.batch_size=4",
        f"pretrain.cache_dir={cache}", *TINY_PHASES, "local.batch_size=4",
        "privacy.photo.delta=1e-3", f"devices.storage_dir={devices}",
        f"checkpoint.dir={checkpoints}",
    ]


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative
    return uri


@pytest.fixture(scope="session", autouse=True)
def _mlflow_schema_from_a_template(tmp_path_factory):
    """Every test's fresh SQLite MLflow store starts as a copy of one store that MLflow
    migrated itself, once per test worker. MLflow 3 runs its ~100 Alembic migrations on
    each new database (3-8 s each; the suite makes ~35); the copy is byte-for-byte what
    those migrations produce, and the store is otherwise untouched. Processes that tests
    start (``experiments.train`` in a subprocess) migrate as a user's would."""
    import sqlite3

    import mlflow.store.db.utils as db_utils
    import sqlalchemy

    migrate = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow-schema") / "migrated.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{template}")
    migrate(engine)
    engine.dispose()

    def copy_the_template(engine):
        if engine.url.get_backend_name() != "sqlite" or engine.url.database in (None, "", ":memory:"):
            return migrate(engine)
        target = engine.raw_connection()
        try:
            with sqlite3.connect(template) as source:
                source.backup(target.driver_connection)
        finally:
            target.close()

    db_utils._initialize_tables = copy_the_template
    yield
    db_utils._initialize_tables = migrate


def pytest_configure(config):
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # The evaluation's attribute net (fl.attributes) is cached by config hash; tests
    # chdir to temp folders, so point every test (and its Ray workers) at the
    # checkout's cache: it is trained once per machine, as for `make run`.
    os.environ.setdefault("FEDFACE_CACHE", str(Path(__file__).parent.parent / ".fedface-cache"))


def pytest_collection_modifyitems(config, items):
    """End-to-end runs first (a stable sort keeps their order): with ``make test``'s
    two workers (pytest-xdist, ``--dist worksteal``), the long ones start early and the
    short ones fill the gaps. Work stealing matters as much: xdist's default ``load``
    hands each worker a quarter of the suite up front, and one worker was left idle for
    15 minutes while the other ran its queue of end-to-end tests."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
