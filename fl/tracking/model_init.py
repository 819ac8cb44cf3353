"""Where a federated run's starting weights come from: ``model.init``.

* ``null``: the public pretraining for this config, trained once and cached
  (``fl.pretrain``). A fresh pretraining is recorded as its own MLflow run in the
  experiment ``<tracking.experiment_name>-pretrain`` (params, loss curve, the
  checkpoint as ``pretrain/checkpoint.pt``), so it can be reviewed and reused
  by URI from another machine.
* a path to a checkpoint file;
* an MLflow artifact URI of one: ``runs:/<run id>/pretrain/checkpoint.pt``, a
  federated run's ``runs:/<run id>/model/shared.pt``, or any artifact URI that
  resolves to exactly one ``.pt`` file. It is downloaded through the configured
  tracking server into the pretraining cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from fl import config as C
from fl.console import say
from fl.device import resolve as resolve_device
from fl.pretrain import cached_pretrain, checkpoint_key
from fl.tracking.mlflow_run import quiet_mlflow, tracking_uri

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
CHECKPOINT_ARTIFACT = "pretrain/checkpoint.pt"


def is_uri(value: str) -> bool:
    return bool(_URI.match(value)) and not Path(value).exists()


def pretrain_record(path: Path) -> Path:
    """Sidecar of a cached checkpoint: which MLflow run holds it."""
    return path.with_suffix(".mlflow.json")


def resolve_init(cfg: DictConfig, log: Callable[[str], None] = say) -> str:
    """A local checkpoint path for ``model.init`` (see the module doc)."""
    from fl.tasks import get_task

    init = cfg.model.init
    if init and is_uri(str(init)):
        return str(download(str(init), cfg))
    if init:
        return str(init)
    pre, task, spec = cfg.pretrain, get_task(C.task_params(cfg)), C.fleet_spec(cfg)

    def record(path: Path, losses: list[float], seconds: float) -> None:
        uri = log_pretraining(cfg, path, losses, seconds,
                              checkpoint_key(task, spec, pre.steps, pre.batch_size, pre.lr,
                                             cfg.seed))
        pretrain_record(path).write_text(json.dumps({"artifact_uri": uri,
                                                     "tracking_uri": tracking_uri(cfg)}))
        log(f"pretraining logged to MLflow: model.init={uri}")

    from fl.pretrain_data import cached_pretrain_on_photos, photo_source

    source = photo_source(pre)  # pretrain.data=celeba|folders: a dataset on disk
    if source is not None:
        return str(cached_pretrain_on_photos(task, spec, source, pre.steps, pre.batch_size,
                                             pre.lr, cfg.seed, pre.cache_dir, log,
                                             on_trained=record))
    return str(cached_pretrain(task, spec, pre.steps, pre.batch_size, pre.lr, cfg.seed,
                               pre.cache_dir, log, on_trained=record,
                               device=resolve_device(str(cfg.get("device") or "auto"))))


def init_source(cfg: DictConfig, path: str) -> str:
    """What to tag a federated run with: the URI its weights came from, if known."""
    if cfg.model.init and is_uri(str(cfg.model.init)):
        return str(cfg.model.init)
    sidecar = pretrain_record(Path(path))
    if sidecar.is_file():
        return json.loads(sidecar.read_text())["artifact_uri"]
    return str(Path(path).resolve())


def log_pretraining(cfg: DictConfig, path: Path, losses: list[float], seconds: float,
                    key: str) -> str:
    """Record a fresh pretraining as an MLflow run; return its checkpoint's URI."""
    quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(f"{cfg.tracking.experiment_name}-pretrain")
    with mlflow.start_run(run_name=f"pretrain-{cfg.task.name}-{key}") as run:
        params = {f"pretrain.{k}": v for k, v in cfg.pretrain.items() if k != "cache_dir"}
        params |= {f"task.{k}": v for k, v in C.task_params(cfg).items()}
        params |= {"data.image_size": cfg.data.image_size, "data.num_public": cfg.data.num_public,
                   "data.seed": cfg.data.seed, "seed": cfg.seed, "checkpoint_key": key}
        mlflow.log_params(params)
        every = max(len(losses) // 100, 1)
        for step in range(0, len(losses), every):
            mlflow.log_metric("pretrain/loss", losses[step], step=step + 1)
        mlflow.log_metric("pretrain/seconds", seconds)
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
            staged.write_bytes(path.read_bytes())
            mlflow.log_artifact(str(staged), artifact_path=str(Path(CHECKPOINT_ARTIFACT).parent))
    return f"runs:/{run.info.run_id}/{CHECKPOINT_ARTIFACT}"


def download(uri: str, cfg: DictConfig) -> Path:
    """Fetch a checkpoint artifact into the pretraining cache; one ``.pt`` file."""
    target = Path(cfg.pretrain.cache_dir) / "mlflow" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    quiet_mlflow()
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri(cfg)))
    except Exception as err:  # noqa: BLE001  (MLflow raises many types for a bad URI)
        raise C.ConfigError(
            f"model.init={uri!r} could not be fetched from MLflow at {tracking_uri(cfg)}: "
            f"{str(err).splitlines()[0]}. Check the run id and artifact path (the MLflow "
            "UI's Artifacts tab), and tracking.uri.") from None
    files = [local] if local.is_file() else sorted(local.rglob("*.pt"))
    if len(files) != 1:
        raise C.ConfigError(f"model.init={uri!r} holds {len(files)} .pt files; point it at "
                            "one checkpoint file")
    return files[0]
