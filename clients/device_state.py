"""What a device keeps between rounds: its personal weights and photo-level ledger.

They live in the device's own directory and nowhere else: not in replies, not
in the server's checkpoint, not in MLflow.

* deployment: the directory given as ``--node-config "state-dir=/path"``; one
  ledger across runs, because the same photos are spent again by every run;
* simulation: ``<devices.storage_dir>/device-NNNNN/state/<MLflow run id>``, so the
  experiments of a sweep never share a ledger while a resumed run (same run id)
  finds its devices' state again.

State is kept in **generations** stamped with the run and the server round that
wrote them (``gen-000007/{personal.pt, ledger.json, stamp.json}``, each written
whole and renamed into place). Why: a server stopped mid-way resumes from its last
checkpoint, so it may send round r again to a device that already trained round
r. The device then starts from the state it had *before* round r, and the privacy
spent in the abandoned attempt is neither counted twice nor lost from the
outcome of the repeated round.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from flwr.app import Context
from torch import nn

from fl import protocol as P
from fl.privacy.ledger import PhotoLedger
from fl.tasks.base import Task

STATE_DIR_KEY = "state-dir"  # node config of a real device
PERSONAL_FILE, LEDGER_FILE, STAMP_FILE = "personal.pt", "ledger.json", "stamp.json"
GENERATION_PREFIX = "gen-"
KEEP_GENERATIONS = 2  # the newest state and the one before it (enough to redo one round)


class DeviceStore:
    """One device's generations of state under ``root``."""

    def __init__(self, root: str | Path, run: str) -> None:
        self.root, self.run = Path(root), run

    def _generations(self) -> list[tuple[int, dict, Path]]:
        """(sequence number, stamp, directory), oldest first. Read from disk every
        time (at most two small folders): another process may have written since."""
        found = []
        for folder in self.root.glob(f"{GENERATION_PREFIX}*"):
            stamp_file = folder / STAMP_FILE
            if folder.is_dir() and stamp_file.is_file():
                found.append((int(folder.name[len(GENERATION_PREFIX):]),
                              json.loads(stamp_file.read_text()), folder))
        return sorted(found, key=lambda g: g[0])

    def _visible(self, before_round: int) -> list[tuple[int, dict, Path]]:
        """Generations a device may build on before ``before_round`` of this run:
        those of earlier runs and of this run's earlier rounds."""
        return [g for g in self._generations()
                if g[1]["run"] != self.run or g[1]["round"] < before_round]

    def _latest(self, before_round: int) -> Path | None:
        visible = self._visible(before_round)
        return visible[-1][2] if visible else None

    def personal(self, before_round: int) -> dict[str, torch.Tensor] | None:
        folder = self._latest(before_round)
        path = folder / PERSONAL_FILE if folder else None
        if path is None or not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def ledger(self, before_round: int) -> dict | None:
        folder = self._latest(before_round)
        return json.loads((folder / LEDGER_FILE).read_text()) if folder else None

    def save(self, server_round: int, personal: dict[str, torch.Tensor], ledger: dict) -> Path:
        """Write the state after ``server_round`` as a new generation, then drop
        generations that a repeated round superseded, and all but the newest few."""
        generations = self._generations()
        sequence = generations[-1][0] + 1 if generations else 1
        final = self.root / f"{GENERATION_PREFIX}{sequence:06d}"
        tmp = self.root / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(personal, tmp / PERSONAL_FILE)
        (tmp / LEDGER_FILE).write_text(json.dumps(ledger))
        (tmp / STAMP_FILE).write_text(json.dumps({"run": self.run, "round": server_round}))
        tmp.rename(final)
        # Keep the generation this one was built on; drop older ones and those of
        # this run's rounds >= server_round (an abandoned attempt, now superseded).
        earlier = [folder for _, stamp, folder in generations
                   if stamp["run"] != self.run or stamp["round"] < server_round]
        kept = set(earlier[-(KEEP_GENERATIONS - 1):])
        for _, _, folder in generations:
            if folder not in kept:
                shutil.rmtree(folder, ignore_errors=True)
        return final


def device_root(context: Context, recipe: P.Recipe, device: int) -> Path:
    if STATE_DIR_KEY in context.node_config:
        return Path(str(context.node_config[STATE_DIR_KEY]))
    return Path(recipe.device_storage) / f"device-{device:05d}" / "state" / (recipe.run or "local")


def device_store(context: Context, recipe: P.Recipe, device: int) -> DeviceStore:
    return DeviceStore(device_root(context, recipe, device), recipe.run)


def erase_all_personal(context: Context, recipe: P.Recipe, device: int) -> None:
    """Remove the device's personal weights of every run (simulation) or of its
    state directory (deployment)."""
    root = device_root(context, recipe, device)
    if STATE_DIR_KEY not in context.node_config:
        root = root.parent  # every run's state of this simulated device
    for path in root.rglob(PERSONAL_FILE):
        path.unlink()


def load_personal(store: DeviceStore, before_round: int, model: nn.Module, task: Task,
                  init: dict[str, torch.Tensor]) -> bool:
    """Load the device's personal weights, or ``init`` before its first round.
    Returns whether the device had personal weights of its own."""
    own = store.personal(before_round)
    personal = {k: v for k, v in (own or init).items() if task.is_personal(k)}
    missing = set(task.personal_state(model)) - set(personal)
    if missing:
        raise ValueError(f"personal state lacks {sorted(missing)}; was it saved by another task?")
    model.load_state_dict(personal, strict=False)
    return own is not None


def load_ledger(store: DeviceStore, before_round: int, accountant: str) -> PhotoLedger:
    config = store.ledger(before_round)
    return PhotoLedger.from_config(config) if config else PhotoLedger(accountant=accountant)


def save_state(store: DeviceStore, server_round: int, model: nn.Module, task: Task,
               ledger: PhotoLedger) -> None:
    personal = {k: v.detach().clone() for k, v in task.personal_state(model).items()}
    store.save(server_round, personal, ledger.to_config())
