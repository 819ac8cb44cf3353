"""The server's checkpoint: everything needed to continue a run after round r.

Written twice per round, atomically: when the round's aggregate is released
(phase ``released``, before the evaluation panel or anyone else sees it) and when
the round is done (phase ``done``; also after round 0's evaluation). A resume
from a ``released`` checkpoint re-uses that release instead of drawing a second
one for the same round. It goes to ``<checkpoint.dir>/<MLflow run id>/last.pt``
and to the run's MLflow artifact ``checkpoint/last.pt``, so whoever reads the run
reads it. It holds only what the server already holds: the shared weights
(released under DP), the strategy's state, the metric history (which carries the
fleet accountant's values), the server's view of the device ledgers (pseudonymous
rows), the round, and, under ``privacy.noise=seeded`` only, the sampling RNG
(under ``secure`` the cohorts stay secret: ``server.loop``). Devices' personal weights
and photo-level ledgers stay on the devices (``clients.device_state``).

Devices are keyed by their pseudonymous index, not by Flower node id: node ids
are new in every simulation or SuperLink session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fl.atomic import atomic_write

CHECKPOINT_FORMAT = "fedface-server-checkpoint/2"  # /2: release phase and state
RELEASED, DONE = "released", "done"
CHECKPOINT_FILE = "last.pt"
ARTIFACT_PATH = "checkpoint"


@dataclass
class LoopState:
    """Where the round loop stands after a round."""

    round: int  # the last released (phase released) or completed round (0: evaluated only)
    shared: dict[str, torch.Tensor]
    history: dict[int, dict[str, float]]
    devices: dict[int, dict[str, Any]]  # device index -> DeviceRecord fields
    exhausted: list[int]  # device indices at their photo-level budget
    panel: list[int]  # device indices of the evaluation panel
    release: dict[str, Any]  # fl.privacy.release state: rounds released so far
    rng: dict[str, Any]  # numpy bit generator state of the device sampling
    strategy: dict[str, Any] = field(default_factory=dict)
    phase: str = DONE  # RELEASED: round's aggregate persisted, evaluation not yet done

    @property
    def progress(self) -> tuple[int, int]:
        """Orders checkpoints of one run: later rounds, then done after released."""
        return self.round, int(self.phase == DONE)


@dataclass
class Checkpoint:
    run_id: str  # the MLflow run a resume continues
    config_yaml: str  # the run's resolved configuration (a resume runs it again)
    personal_init: dict[str, torch.Tensor]  # public starting point of personal parts
    loop: LoopState


def _encode(value: Any) -> Any:
    """Strategy state in types ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, ArrayRecord):
        return {"__array_record__": value.to_torch_state_dict()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(value))}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__array_record__" in value:
        return ArrayRecord(value["__array_record__"])
    if isinstance(value, dict) and "__ndarray__" in value:
        return value["__ndarray__"].numpy()
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _holds_arrays(value: Any) -> bool:
    if isinstance(value, ArrayRecord | np.ndarray):
        return True
    if isinstance(value, dict):
        return any(_holds_arrays(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_arrays(v) for v in value)
    return False


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The attributes a Flower strategy learns while running (FedAvgM's momentum,
    FedAdam's moments, current weights): those that hold arrays. Its settings
    come from the config again on resume."""
    return {name: _encode(value) for name, value in vars(strategy).items()
            if _holds_arrays(value)}


def restore_strategy(strategy: Strategy, state: dict[str, Any]) -> None:
    """Only attributes a fresh strategy of the configured class already has (a
    checkpoint must not set ``__dict__`` or add behaviour)."""
    unknown = sorted(set(state) - set(vars(strategy)))
    if unknown:
        raise ValueError(f"the checkpoint's strategy state names {unknown[:3]}, which a "
                         f"{type(strategy).__name__} does not have; it is not this run's")
    for name, value in state.items():
        setattr(strategy, name, _decode(value))


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    payload = {"format": CHECKPOINT_FORMAT, **vars(checkpoint), "loop": vars(checkpoint.loop)}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> Checkpoint:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable fedface server checkpoint ({err})") from err
    if isinstance(payload, dict) and str(payload.get("format", "")).startswith(
            CHECKPOINT_FORMAT.rsplit("/", 1)[0]) and payload["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} was written by another fedface version ({payload['format']}, "
                         f"this one reads {CHECKPOINT_FORMAT}); resume it with that version")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fedface server checkpoint ({CHECKPOINT_FORMAT}); "
                         "resume takes the checkpoint/last.pt of a fedface run, or its run id")
    payload.pop("format")
    payload["loop"] = LoopState(**payload["loop"])
    return Checkpoint(**payload)
