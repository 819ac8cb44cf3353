"""What a device keeps between rounds, in its own ``context.state``.

Personal weights and the photo-level ledger live here and nowhere else: not in
replies, not in the server's checkpoint, not in MLflow.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import nn

from fl.privacy.ledger import PhotoLedger
from fl.tasks.base import Task

PERSONAL_KEY, LEDGER_KEY = "personal", "ledger"


def has_personal_state(context: Context) -> bool:
    return PERSONAL_KEY in context.state


def load_personal(context: Context, model: nn.Module, task: Task,
                  init: dict[str, torch.Tensor]) -> None:
    """Load this device's personal weights, or ``init`` before its first round."""
    state = (context.state[PERSONAL_KEY].to_torch_state_dict()
             if has_personal_state(context) else init)
    personal = {k: v for k, v in state.items() if task.is_personal(k)}
    missing = set(task.personal_state(model)) - set(personal)
    if missing:
        raise ValueError(f"personal state lacks {sorted(missing)}; was it saved by another task?")
    model.load_state_dict(personal, strict=False)


def erase_personal(context: Context) -> None:
    """Remove the personal weights from the device's stored state."""
    if PERSONAL_KEY in context.state:
        del context.state[PERSONAL_KEY]


def save_personal(context: Context, model: nn.Module, task: Task) -> None:
    context.state[PERSONAL_KEY] = ArrayRecord(
        {k: v.detach().clone() for k, v in task.personal_state(model).items()})


def load_ledger(context: Context, accountant: str) -> PhotoLedger:
    if LEDGER_KEY in context.state:
        return PhotoLedger.from_config(dict(context.state[LEDGER_KEY]))
    return PhotoLedger(accountant=accountant)


def save_ledger(context: Context, ledger: PhotoLedger) -> None:
    context.state[LEDGER_KEY] = ConfigRecord(ledger.to_config())
