"""A parallel launcher's jobs find one sweep parent, never two."""

from __future__ import annotations

import threading

import mlflow
import pytest
from omegaconf import OmegaConf

from fl.tracking.sweep import ROLE_TAG, Sweep, SweepCallback, parent_run_id, sweep_id_of


def _live_parents(client, experiment_id):
    return [r for r in client.search_runs([experiment_id])
            if r.data.tags.get(ROLE_TAG) == "sweep"]


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One store for both tests (creating a sqlite store takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'm.db'}"


def test_the_callback_creates_the_parent_before_any_job(tmp_path, uri):
    config = OmegaConf.create({"tracking": {"uri": uri, "experiment_name": "e"},
                               "hydra": {"sweep": {"dir": str(tmp_path / "multirun")}}})
    SweepCallback().on_multirun_start(config)
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("e").experiment_id
    (parent,) = _live_parents(client, experiment_id)
    sweep = Sweep(sweep_id_of(tmp_path / "multirun"), str(tmp_path / "multirun"), "a=1", 0)
    assert parent_run_id(client, experiment_id, sweep) == parent.info.run_id


def test_parallel_jobs_without_the_callback_still_make_one_parent(tmp_path, uri):
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("race")
    sweep = Sweep(sweep_id_of(tmp_path), str(tmp_path), "", 0)
    found, start = [], threading.Barrier(4)

    def job():
        start.wait()
        found.append(parent_run_id(client, experiment_id, sweep))

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (parent,) = _live_parents(client, experiment_id)
    assert set(found) == {parent.info.run_id}
