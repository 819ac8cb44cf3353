"""A task = model + losses + metrics + which weights are shared and which personal.

Tasks register themselves by name (``task.name`` in the config picks one), so
the trainer, the ClientApp and the ServerApp never branch on task names: adding
the portrait task is a new module with ``@register_task("portrait")``, not a fork
of the training path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fl.data.fleet import DevicePhotos, FleetSpec
from fl.models.swap import PERSONAL_PREFIX

_TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    def decorate(cls: type[Task]) -> type[Task]:
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorate


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(params: Mapping[str, Any]) -> Task:
    """Build the task named ``params['name']`` from the ``task`` config group."""
    name = params.get("name")
    if name not in _TASKS:
        raise ValueError(f"task.name={name!r} is not a task; choose one of {sorted(_TASKS)}")
    return _TASKS[name](**{k: v for k, v in params.items() if k != "name"})


class Task(ABC):
    name: str = ""

    #: Shared-weight prefixes that devices fine-tune (and therefore send back).
    device_trains: tuple[str, ...] = ()
    #: Size of the personal identity embedding (pretraining keeps one per public identity).
    personal_dim: int = 0

    @abstractmethod
    def architecture(self) -> dict[str, Any]:
        """What determines the model's weights' shapes (keys the pretraining cache)."""

    @abstractmethod
    def build_model(self, image_size: int) -> nn.Module:
        """A fresh model whose personal weights live under ``personal.``."""

    @abstractmethod
    def device_loss(self, model: nn.Module, photos: torch.Tensor) -> torch.Tensor:
        """Mean loss of the device's own photos (the only data a device has)."""

    @abstractmethod
    def pretrain_loss(self, model: nn.Module, identities: nn.Embedding, spec: FleetSpec,
                      rng: np.random.Generator, batch_size: int) -> torch.Tensor:
        """Loss of one central pretraining batch drawn from *public* identities."""

    @abstractmethod
    def evaluate_device(self, model: nn.Module, photos: DevicePhotos,
                        spec: FleetSpec) -> dict[str, float]:
        """Quality metrics on a device's held-out data (names without prefix)."""

    # The split below is the privacy boundary: personal weights never leave a device.
    def is_personal(self, key: str) -> bool:
        return key.startswith(PERSONAL_PREFIX)

    def is_device_trained(self, key: str) -> bool:
        """Shared weights that devices fine-tune and send back to the server."""
        return not self.is_personal(key) and key.startswith(self.device_trains)

    def shared_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if not self.is_personal(k)}

    def personal_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if self.is_personal(k)}

    def fit_personal(self, model: nn.Module, photos: torch.Tensor, steps: int,
                     lr: float = 0.05, batch_size: int = 16, seed: int = 0) -> None:
        """Fit only the personal part on frozen shared weights (no DP: for *public*
        identities, e.g. the server's new-user check)."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            param.requires_grad_(self.is_personal(name))
        personal = [p for n, p in model.named_parameters() if self.is_personal(n)]
        optimizer = torch.optim.Adam(personal, lr=lr)
        model.train()
        for _ in range(steps):
            idx = torch.randint(len(photos), (min(batch_size, len(photos)),), generator=generator)
            loss = self.device_loss(model, photos[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
