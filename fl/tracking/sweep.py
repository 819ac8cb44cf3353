"""A Hydra multirun = one MLflow parent run (the sweep) + one child run per job.

Each job finds (or, first, creates) the parent by the tag ``fedface.sweep_id``,
a hash of Hydra's sweep directory, so the pairing works for any launcher and
sweeper that gives the jobs one sweep directory. The Hydra callback
``SweepCallback`` (registered in configs/config.yaml) closes the parent when the
multirun ends and writes the sweep report (``experiments.report``) to it.
"""

from __future__ import annotations

import hashlib
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
    """The sweep's parent run, created by the first job that asks."""
    parent = find_parent(client, experiment_id, sweep.sweep_id)
    if parent is not None:
        return parent.info.run_id
    run = client.create_run(experiment_id, run_name=f"sweep-{sweep.sweep_id}", tags={
        SWEEP_ID_TAG: sweep.sweep_id, ROLE_TAG: "sweep", "fedface.sweep_dir": sweep.sweep_dir})
    return run.info.run_id


def child_tags(sweep: Sweep) -> dict[str, str]:
    return {SWEEP_ID_TAG: sweep.sweep_id, ROLE_TAG: "job", OVERRIDES_TAG: sweep.overrides,
            JOB_TAG: str(sweep.job)}


class SweepCallback(Callback):
    """Closes the sweep's parent run and logs its report when a multirun ends."""

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
            return  # no job got as far as MLflow (e.g. invalid configuration)
        try:
            report = build_report(uri, parent.info.run_id,
                                  Path(config.hydra.sweep.dir) / "report")
            say(f"sweep report: {report.markdown_path} (and on MLflow run {parent.info.run_id})")
        finally:
            client.set_terminated(parent.info.run_id, "FINISHED")
