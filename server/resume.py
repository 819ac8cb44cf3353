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

from fl.config import ConfigError, flatten, validate_strategy
from fl.tracking import keys as K
from fl.tracking.mlflow_run import CONFIG_ARTIFACT, quiet_mlflow, tracking_uri
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
    """Refuse a checkpoint that disagrees with its run's MLflow record.

    The user-level budget rests on the checkpoint's configuration (the privacy
    plan, the rounds), its count of released rounds (``release.released``) and the
    history the accountant's values came from; a checkpoint edited in any of them
    would let a resume spend the budget again. MLflow holds the configuration
    logged when the run started and every completed round, so the checkpoint must
    carry the same configuration (but for ``RESUMABLE`` keys), count one release
    per round, know every round MLflow logged, and hold the same values for them.
    A run that cannot be read in the tracking store is refused: the check fails
    closed."""
    loop, uri = checkpoint.loop, tracking_uri(cfg)
    client = MlflowClient(uri)
    try:
        client.get_run(checkpoint.run_id)
        logged_config = Path(client.download_artifacts(checkpoint.run_id, CONFIG_ARTIFACT))
        logged = {key: client.get_metric_history(checkpoint.run_id, key) for key in COUNTERS}
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for a missing run
        raise ConfigError(
            f"resume={cfg.resume!r}: run {checkpoint.run_id} or its logged configuration "
            f"cannot be read at {uri} ({str(err).splitlines()[0][:120]}); a checkpoint is "
            "checked against its run's MLflow record before it is trusted. Give the run's "
            "tracking.uri.") from None
    problems = _config_differences(checkpoint.config_yaml, logged_config.read_text())
    released = int(loop.release.get("released", -1))
    if released != loop.round:
        problems.append(f"it counts {released} released rounds after round {loop.round}")
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
            f"the run's MLflow record: {'; '.join(problems)}. It was edited or belongs to "
            "another run; resuming from it could spend the privacy budget again. Resume from "
            "the run's own newest checkpoint.")


def _config_differences(saved_yaml: str, logged_yaml: str) -> list[str]:
    def comparable(text: str) -> dict[str, str]:
        flat = flatten(OmegaConf.create(text))
        return {k: v for k, v in flat.items()
                if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)}

    saved, logged = comparable(saved_yaml), comparable(logged_yaml)
    differ = sorted(k for k in saved.keys() | logged.keys() if saved.get(k) != logged.get(k))
    if not differ:
        return []
    shown = ", ".join(f"{k}={saved.get(k)!s} (logged {logged.get(k)!s})" for k in differ[:3])
    return [f"its configuration differs from the one logged at the start: {shown}"]


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
