"""A Hydra multirun = one MLflow parent run (the sweep) + one child run per job.

The Hydra callback ``SweepCallback`` (registered in configs/config.yaml)
creates the parent once, before the jobs start, so that parallel launchers
never make two; each job finds it by the tag ``fedface.sweep_id``, a hash of
Hydra's sweep directory, which works for any launcher and sweeper that gives
the jobs one sweep directory. The callback closes the parent when the multirun
ends and writes the sweep report (``experiments.report``) to it.
"""

from __future__ import annotations

import fcntl
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from fl.console import say

SWEEP_ID_TAG = "fedface.sweep_id"
ROLE_TAG = "fedface.role"  # "sweep" on the parent, "job" on each child
OVERRIDES_TAG = "fedface.overrides"
JOB_TAG = "fedface.job"
PARENT_LOCK = ".fedface-sweep-parent.lock"  # in the sweep directory


@dataclass(frozen=True)
class Sweep:
    sweep_id: str
    sweep_dir: str
    overrides: str  # this job's overrides, space-separated
    job: int


def sweep_id_of(sweep_dir: str | Path) -> str:
    return hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:12]


def current_sweep() -> Sweep | None:
    """The Hydra multirun this job belongs to, if any."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return Sweep(sweep_id_of(hydra.sweep.dir), str(hydra.sweep.dir),
                 " ".join(hydra.overrides.task), int(hydra.job.num))


def find_parent(client: mlflow.MlflowClient, experiment_id: str, sweep_id: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}' and tags.`{ROLE_TAG}` = 'sweep'",
        max_results=1)
    return runs[0] if runs else None


def parent_run_id(client: mlflow.MlflowClient, experiment_id: str, sweep: Sweep) -> str:
    """The sweep's parent run, found or created under a lock in the sweep
    directory, which every job of a multirun shares: jobs that a parallel
    launcher (joblib, Ray) starts at once cannot both miss it and create two.
    ``SweepCallback.on_multirun_start`` normally creates it before any job."""
    with _locked(Path(sweep.sweep_dir) / PARENT_LOCK):
        parent = find_parent(client, experiment_id, sweep.sweep_id)
        if parent is not None:
            return parent.info.run_id
        return client.create_run(experiment_id, run_name=f"sweep-{sweep.sweep_id}", tags={
            SWEEP_ID_TAG: sweep.sweep_id, ROLE_TAG: "sweep",
            "fedface.sweep_dir": sweep.sweep_dir}).info.run_id


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def child_tags(sweep: Sweep) -> dict[str, str]:
    return {SWEEP_ID_TAG: sweep.sweep_id, ROLE_TAG: "job", OVERRIDES_TAG: sweep.overrides,
            JOB_TAG: str(sweep.job)}


class SweepCallback(Callback):
    """Creates the sweep's parent run before the jobs start, and closes it with
    its report when the multirun ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from fl.tracking.mlflow_run import quiet_mlflow, tracking_uri

        quiet_mlflow()
        client = mlflow.MlflowClient(tracking_uri(config))
        name = config.tracking.experiment_name
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else \
            client.create_experiment(name)
        sweep_dir = str(config.hydra.sweep.dir)
        parent_run_id(client, experiment_id, Sweep(sweep_id_of(sweep_dir), sweep_dir, "", -1))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from fl.tracking.mlflow_run import quiet_mlflow, tracking_uri
        from fl.tracking.sweep_report import build_report

        quiet_mlflow()
        uri = tracking_uri(config)
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment_name)
        sweep_id = sweep_id_of(config.hydra.sweep.dir)
        parent = find_parent(client, experiment.experiment_id, sweep_id) if experiment else None
        if parent is None:
            return
        jobs = client.search_runs([experiment.experiment_id], max_results=1, filter_string=(
            f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}' and tags.`{ROLE_TAG}` = 'job'"))
        if not jobs:  # no job got as far as MLflow (e.g. an invalid configuration)
            client.set_terminated(parent.info.run_id, "FAILED")
            return
        try:
            report = build_report(uri, parent.info.run_id,
                                  Path(config.hydra.sweep.dir) / "report")
            say(f"sweep report: {report.markdown_path} (and on MLflow run {parent.info.run_id})")
        finally:
            client.set_terminated(parent.info.run_id, "FINISHED")
