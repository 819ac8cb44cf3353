"""What a device keeps between rounds: its personal weights and photo-level ledger.

They live in the device's own store and nowhere else: not in replies, not in the
server's checkpoint, not in MLflow. Two stores, one interface:

* simulation: Flower's ``context.state`` (kept by the Simulation Engine per node);
* deployment: the directory given as ``--node-config "state-dir=/path"``
  (``personal.pt``, ``ledger.json``, written atomically), so the ledger survives
  SuperNode restarts and a device's privacy spend is never forgotten.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import nn

from fl.atomic import atomic_write
from fl.privacy.ledger import PhotoLedger
from fl.tasks.base import Task

PERSONAL_KEY, LEDGER_KEY = "personal", "ledger"
STATE_DIR_KEY = "state-dir"  # node config of a real device
PERSONAL_FILE, LEDGER_FILE = "personal.pt", "ledger.json"


class ContextStore:
    """``context.state`` records (simulation)."""

    def __init__(self, context: Context) -> None:
        self.state = context.state

    def has_personal(self) -> bool:
        return PERSONAL_KEY in self.state

    def personal(self) -> dict[str, torch.Tensor] | None:
        return self.state[PERSONAL_KEY].to_torch_state_dict() if self.has_personal() else None

    def put_personal(self, weights: dict[str, torch.Tensor]) -> None:
        self.state[PERSONAL_KEY] = ArrayRecord(weights)

    def erase_personal(self) -> None:
        if PERSONAL_KEY in self.state:
            del self.state[PERSONAL_KEY]

    def ledger(self) -> dict | None:
        return dict(self.state[LEDGER_KEY]) if LEDGER_KEY in self.state else None

    def put_ledger(self, config: dict) -> None:
        self.state[LEDGER_KEY] = ConfigRecord(config)


class DirectoryStore:
    """Files in the device's state directory (deployment)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def has_personal(self) -> bool:
        return (self.folder / PERSONAL_FILE).is_file()

    def personal(self) -> dict[str, torch.Tensor] | None:
        path = self.folder / PERSONAL_FILE
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def put_personal(self, weights: dict[str, torch.Tensor]) -> None:
        atomic_write(self.folder / PERSONAL_FILE, lambda tmp: torch.save(weights, tmp))

    def erase_personal(self) -> None:
        (self.folder / PERSONAL_FILE).unlink(missing_ok=True)

    def ledger(self) -> dict | None:
        path = self.folder / LEDGER_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def put_ledger(self, config: dict) -> None:
        atomic_write(self.folder / LEDGER_FILE, lambda tmp: tmp.write_text(json.dumps(config)))


def store(context: Context) -> ContextStore | DirectoryStore:
    if STATE_DIR_KEY in context.node_config:
        return DirectoryStore(str(context.node_config[STATE_DIR_KEY]))
    return ContextStore(context)


def has_personal_state(context: Context) -> bool:
    return store(context).has_personal()


def load_personal(context: Context, model: nn.Module, task: Task,
                  init: dict[str, torch.Tensor]) -> None:
    """Load this device's personal weights, or ``init`` before its first round."""
    state = store(context).personal() or init
    personal = {k: v for k, v in state.items() if task.is_personal(k)}
    missing = set(task.personal_state(model)) - set(personal)
    if missing:
        raise ValueError(f"personal state lacks {sorted(missing)}; was it saved by another task?")
    model.load_state_dict(personal, strict=False)


def erase_personal(context: Context) -> None:
    """Remove the personal weights from the device's stored state."""
    store(context).erase_personal()


def save_personal(context: Context, model: nn.Module, task: Task) -> None:
    store(context).put_personal(
        {k: v.detach().clone() for k, v in task.personal_state(model).items()})


def load_ledger(context: Context, accountant: str) -> PhotoLedger:
    config = store(context).ledger()
    return PhotoLedger.from_config(config) if config else PhotoLedger(accountant=accountant)


def save_ledger(context: Context, ledger: PhotoLedger) -> None:
    store(context).put_ledger(ledger.to_config())
