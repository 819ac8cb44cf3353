"""``resume=<MLflow run id or checkpoint path>``: continue a run that stopped.

The resumed run is the *same* experiment: its configuration is the one saved in
the checkpoint, and only settings that cannot change the result may be given
again (``RESUMABLE``). Extending ``fleet.rounds`` is refused on purpose: noise
calibrated to a target epsilon depends on the planned rounds, so changing them
mid-run would change the privacy accounting under the devices' feet.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fl.config import ConfigError, validate_strategy
from fl.tracking import keys as K
from fl.tracking.mlflow_run import quiet_mlflow, tracking_uri
from server.checkpoint import ARTIFACT_PATH, CHECKPOINT_FILE, Checkpoint, load_checkpoint

RESUMABLE = ("resume", "verbose", "tracking.uri", "checkpoint.dir", "fleet.round_timeout")


def local_checkpoint(cfg: DictConfig, run_id: str) -> Path:
    return Path(cfg.checkpoint.dir) / run_id / CHECKPOINT_FILE


def _download(cfg: DictConfig, run_id: str) -> Path:
    """The run's checkpoint as logged to MLflow (its newest: logged at every write)."""
    quiet_mlflow()
    return Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"runs:/{run_id}/{ARTIFACT_PATH}/{CHECKPOINT_FILE}",
        tracking_uri=tracking_uri(cfg)))


def _artifact(cfg: DictConfig, run_id: str) -> Path | None:
    try:
        return _download(cfg, run_id)
    except Exception:  # noqa: BLE001 - no such run or store here: nothing newer known
        return None


def find_checkpoint(resume: str, cfg: DictConfig) -> Path:
    """A checkpoint file, a run's checkpoint directory, or a run id (looked up in
    ``checkpoint.dir``, then in the run's MLflow artifacts)."""
    path = Path(resume)
    if path.is_file():
        return path
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    if local_checkpoint(cfg, resume).is_file():
        return local_checkpoint(cfg, resume)
    try:
        return _download(cfg, resume)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for a bad id
        raise ConfigError(
            f"resume={resume!r} is neither a checkpoint file nor an MLflow run with a "
            f"checkpoint at {tracking_uri(cfg)} ({str(err).splitlines()[0]}). Give the run id "
            "shown when the run started, or the path of its checkpoint/last.pt") from None


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def refuse_older(cfg: DictConfig, path: Path, checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint older than the run's newest (in ``checkpoint.dir`` or MLflow).

    Resuming from it would redo rounds whose aggregates were already released,
    with new noise: two releases of one round leak their difference. (Devices
    refuse too, when they hold state of a later round: ``server.loop``.)
    """
    for newest in (local_checkpoint(cfg, checkpoint.run_id), _artifact(cfg, checkpoint.run_id)):
        if newest is None or not newest.is_file() or newest.resolve() == path.resolve():
            continue
        try:
            latest = load_checkpoint(newest).loop
        except ValueError:
            continue  # unreadable: the devices' own check still applies
        if latest.progress <= checkpoint.loop.progress:
            continue
        raise ConfigError(
            f"resume={cfg.resume!r} is the checkpoint of round {checkpoint.loop.round} "
            f"({checkpoint.loop.phase}), but run {checkpoint.run_id} already reached round "
            f"{latest.round} ({latest.phase}); resuming from it would release rounds twice. "
            f"Resume from the newest checkpoint: resume={checkpoint.run_id} (it is {newest})")


# Counters a checkpoint carries that the run's MLflow history also holds, per round.
COUNTERS = (K.DEVICES_SAMPLED, K.DEVICES_TRAINED, K.USER_EPS)


def check_history(cfg: DictConfig, checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint whose counters disagree with the run's MLflow history.

    The user-level budget is the count of released rounds (``release.released``)
    and the history the accountant's values came from; a checkpoint edited to
    count fewer would let a resume spend the budget again. MLflow logged every
    completed round, so the checkpoint must know at least those rounds, count one
    release per round, and hold the same values for them."""
    loop = checkpoint.loop
    released = int(loop.release.get("released", -1))
    problems = []
    if released != loop.round:
        problems.append(f"it counts {released} released rounds after round {loop.round}")
    client = MlflowClient(tracking_uri(cfg))
    try:
        logged = {key: client.get_metric_history(checkpoint.run_id, key) for key in COUNTERS}
    except Exception:  # noqa: BLE001 - no such run in this store: the resume says so
        logged = {}
    last = max((m.step for series in logged.values() for m in series), default=0)
    if last > loop.round:
        problems.append(f"MLflow logged round {last}, after its round {loop.round}")
    for key, series in logged.items():
        for metric in series:
            kept = loop.history.get(metric.step, {}).get(key)
            if metric.step <= loop.round and (kept is None or not math.isclose(
                    float(kept), metric.value, rel_tol=1e-9, abs_tol=1e-12)):
                problems.append(f"its {key} of round {metric.step} is {kept}, MLflow "
                                f"logged {metric.value}")
                break
    if problems:
        raise ConfigError(
            f"resume={cfg.resume!r}: the checkpoint of run {checkpoint.run_id} disagrees with "
            f"the run's MLflow history: {'; '.join(problems)}. It was edited or belongs to "
            "another run; resuming from it could spend the privacy budget again. Resume from "
            "the run's own newest checkpoint.")


def resumed_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Checkpoint]:
    """The checkpoint's configuration with the allowed ``overrides`` applied."""
    try:
        path = find_checkpoint(str(cfg.resume), cfg)
        checkpoint = load_checkpoint(path)
    except ConfigError:
        raise
    except ValueError as err:  # a file that is not a fedface checkpoint
        raise ConfigError(f"resume={cfg.resume!r}: {err}") from None
    refuse_older(cfg, path, checkpoint)
    check_history(cfg, checkpoint)
    refused = [o for o in overrides if _key(o) not in RESUMABLE]
    if refused:
        raise ConfigError(
            f"resume continues run {checkpoint.run_id} with its own configuration; "
            f"{' '.join(refused)} cannot change on resume (allowed: {', '.join(RESUMABLE)}). "
            "To change settings, start a new run with model.init=runs:/"
            f"{checkpoint.run_id}/model/shared.pt")
    saved = OmegaConf.create(checkpoint.config_yaml)
    allowed = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])
    merged = OmegaConf.merge(saved, allowed)
    validate_strategy(merged)  # a checkpoint's config must not instantiate anything else
    return merged, checkpoint
