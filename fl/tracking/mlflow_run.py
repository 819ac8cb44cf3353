"""One MLflow run per experiment: params, config, per-round metrics, final model.

The tracking URI comes from ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
else a sqlite store in the working directory; a researcher's shared server is
one override away.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf

from fl.config import flatten
from fl.pretrain import save_checkpoint
from fl.privacy.plan import PrivacyPlan
from fl.tracking.privacy_report import (
    as_json,
    epsilon_chart,
    ledger_rows,
    plt,
    report,
    to_markdown,
)

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(cfg: DictConfig) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def quiet_mlflow() -> None:
    """MLflow's sqlite store trips a SQLAlchemy deprecation that is MLflow's to fix."""
    warnings.filterwarnings("ignore", message=".*noload.*")


class RunLogger:
    """Owns one MLflow run; every write goes through it."""

    def __init__(self, cfg: DictConfig) -> None:
        self.uri = tracking_uri(cfg)
        mlflow.set_tracking_uri(self.uri)
        quiet_mlflow()
        mlflow.set_experiment(cfg.tracking.experiment_name)
        self.run = mlflow.start_run(run_name=cfg.tracking.run_name)
        self.run_id = self.run.info.run_id
        self.client = mlflow.MlflowClient(self.uri)
        params = flatten(cfg)
        mlflow.log_params({k: v[:6000] for k, v in params.items()})
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")

    def log_params(self, params: dict[str, str]) -> None:
        mlflow.log_params(params)

    def set_tag(self, key: str, value: str) -> None:
        mlflow.set_tag(key, value)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_shared_model(self, shared_state: dict[str, torch.Tensor],
                         personal_init: dict[str, torch.Tensor]) -> None:
        """The final shared weights (and the public personal init) as an artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / "shared.pt", shared_state, personal_init)
            mlflow.log_artifact(str(path), artifact_path="model")

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
