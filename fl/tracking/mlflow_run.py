"""One MLflow run per experiment: params, config, per-round metrics, final model.

The tracking URI comes from ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
else a sqlite store in the working directory; a researcher's shared server is
one override away.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf

from fl.config import flatten, tracking_uri
from fl.data.fleet import FleetSpec
from fl.pretrain import save_checkpoint
from fl.privacy.plan import PrivacyPlan
from fl.tracking.mlflow_model import log_shared_model as log_pyfunc_model
from fl.tracking.privacy_report import (
    as_json,
    epsilon_chart,
    ledger_rows,
    plt,
    report,
    to_markdown,
)
from fl.tracking.sweep import child_tags, current_sweep, parent_run_id
from fl.tracking.system_report import system_chart

CONFIG_ARTIFACT = "config/config.yaml"
OBJECTIVE_TAG = "fedface.objective"  # the metric key experiments.train returns


def quiet_mlflow() -> None:
    """Keep the console for fedface's own lines: MLflow's sqlite store trips a
    SQLAlchemy deprecation and its tables a pandas one (both MLflow's to fix),
    and its INFO chatter (creating tables, validating examples) goes to the log
    file (the root logger's handlers: Hydra's job log) instead of the console.
    Warnings and errors still show."""
    warnings.filterwarnings("ignore", message=".*noload.*")
    warnings.filterwarnings("ignore", message=".*select_dtypes.*")
    mlflow_logger = logging.getLogger("mlflow")
    for handler in mlflow_logger.handlers:
        handler.setLevel(logging.WARNING)
    mlflow_logger.propagate = True


class RunLogger:
    """Owns one MLflow run; every write goes through it.

    A sweep's job becomes a child of the sweep's parent run (``fl.tracking.sweep``);
    a resumed run (``resume_run_id``) is continued, not started again: its params
    and config were logged when it started and MLflow keeps them unchanged.
    """

    def __init__(self, cfg: DictConfig, resume_run_id: str | None = None) -> None:
        self.uri = tracking_uri(cfg)
        mlflow.set_tracking_uri(self.uri)
        quiet_mlflow()
        experiment = mlflow.set_experiment(cfg.tracking.experiment_name)
        self.client = mlflow.MlflowClient(self.uri)
        if resume_run_id:
            self.run = mlflow.start_run(run_id=resume_run_id)
        else:
            sweep = current_sweep()
            parent = (parent_run_id(self.client, experiment.experiment_id, sweep)
                      if sweep else None)
            self.run = mlflow.start_run(run_name=cfg.tracking.run_name, parent_run_id=parent,
                                        tags=child_tags(sweep) if sweep else None)
        self.run_id = self.run.info.run_id
        if not resume_run_id:
            params = flatten(cfg)
            mlflow.log_params({k: v[:6000] for k, v in params.items()})
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), CONFIG_ARTIFACT)

    def log_params(self, params: dict[str, str]) -> None:
        mlflow.log_params(params)

    def set_tag(self, key: str, value: str) -> None:
        mlflow.set_tag(key, value)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_artifact(self, path: str | Path, artifact_path: str) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_image(self, image, artifact_file: str) -> None:
        mlflow.log_image(image, artifact_file=artifact_file)

    def log_shared_model(self, shared_state: dict[str, torch.Tensor],
                         personal_init: dict[str, torch.Tensor], task_params: dict,
                         spec: FleetSpec, registered_name: str | None) -> str:
        """The final shared weights: the checkpoint file ``model/shared.pt`` (what
        ``model.init`` takes) and an MLflow pyfunc model with a signature,
        registered under ``registered_name`` if given. Returns the model's URI."""
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / "shared.pt", shared_state, personal_init)
            mlflow.log_artifact(str(path), artifact_path="model")
        uri = log_pyfunc_model(task_params, spec, shared_state, personal_init, registered_name)
        mlflow.set_tag("fedface.model_uri", uri)
        return uri

    def log_system_figure(self, history: dict[int, dict[str, float]]) -> None:
        figure = system_chart(history)
        mlflow.log_figure(figure, "system/rounds.png")
        plt.close(figure)

    def log_privacy_review(self, plan: PrivacyPlan, history: dict[int, dict[str, float]],
                           devices: dict, stopped: str) -> None:
        """Ledger table, privacy report (markdown + JSON) and epsilon chart."""
        rows = ledger_rows(devices, plan)
        if rows:
            mlflow.log_table({k: [row[k] for row in rows] for k in rows[0]},
                             artifact_file="privacy/ledger.json")
        data = report(plan, history, stopped)
        mlflow.log_text(to_markdown(data), "privacy/report.md")
        mlflow.log_text(as_json(data), "privacy/report.json")
        figure = epsilon_chart(history, plan)
        mlflow.log_figure(figure, "privacy/epsilon.png")
        plt.close(figure)

    def end(self, status: str = "FINISHED") -> None:
        mlflow.end_run(status=status)

    def ui_command(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri}"
        return f"mlflow ui --backend-store-uri {self.uri}"
