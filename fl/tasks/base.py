"""A task = model + losses + metrics + which weights are shared and which personal.

Tasks register themselves by name (``task.name`` in the config picks one), so
the trainer, the ClientApp and the ServerApp never branch on task names: adding
the portrait task is a new module with ``@register_task("portrait")``, not a fork
of the training path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fl.data.device_data import DeviceData
from fl.data.fleet import FleetSpec
from fl.models.blocks import PERSONAL_PREFIX

_TASKS: dict[str, type[Task]] = {}
EMBEDDING_KEY = f"{PERSONAL_PREFIX}embedding.weight"


@dataclass
class SampleColumn:
    """One column of a sample grid: images ``(N, 3, S, S)`` in [0, 1], or one
    text label per row (e.g. the controls a portrait was asked for)."""

    title: str
    images: torch.Tensor | None = None
    labels: list[str] | None = None


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
    #: The device-side quality metric that sums the task up (new-user check, objective).
    primary_metric: str = ""
    #: Whether a device's photos need portrait controls (labels) to train.
    needs_controls: bool = False
    #: Weight of the structural term (1 - SSIM) beside the MSE in pretraining
    #: (``fl.models.losses``): without it small features (eyes, mouth) are lost.
    structure_weight: float = 0.1

    @abstractmethod
    def architecture(self) -> dict[str, Any]:
        """What determines the model's weights' shapes (keys the pretraining cache)."""

    @abstractmethod
    def build_model(self, image_size: int) -> nn.Module:
        """A fresh model whose personal weights live under ``personal.``."""

    def training_tensors(self, data: DeviceData) -> tuple[torch.Tensor, ...]:
        """What the device trains on, one row per photo (DP-SGD samples rows)."""
        return (torch.from_numpy(data.train),)

    @abstractmethod
    def device_loss(self, model: nn.Module, *batch: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch of ``training_tensors`` rows (the device's own photos)."""

    @abstractmethod
    def pretrain_loss(self, model: nn.Module, identities: nn.Embedding, spec: FleetSpec,
                      rng: np.random.Generator, batch_size: int) -> torch.Tensor:
        """Loss of one central pretraining batch drawn from *public* identities."""

    @abstractmethod
    def evaluate_device(self, model: nn.Module, data: DeviceData,
                        spec: FleetSpec) -> dict[str, float]:
        """Quality metrics on a device's held-out data (names without prefix).

        Metrics that need SynthFaces' ground truth are computed only when
        ``data.identity`` is known; real photos get the held-out ones."""

    @abstractmethod
    def model_input(self, identity: Any, spec: FleetSpec, rows: int) -> torch.Tensor:
        """``rows`` inputs of the model's forward pass for a SynthFaces identity
        (clip frames, or portrait conditions): the MLflow model's input example."""

    @abstractmethod
    def sample_columns(self, model: nn.Module, identity: Any, spec: FleetSpec,
                       rows: int) -> list[SampleColumn]:
        """Input, output and ground truth for a *public* SynthFaces identity."""

    def personal_init(self, model: nn.Module, identity: torch.Tensor) -> dict[str, torch.Tensor]:
        """The public starting point of every device's personal part: the model's
        fresh personal state with ``identity`` as the embedding."""
        init = {k: v.detach().clone() for k, v in self.personal_state(model).items()}
        init[EMBEDDING_KEY] = identity.detach().clone()
        return init

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

    @abstractmethod
    def pretrain_loss_on_photos(self, model: nn.Module, photos: torch.Tensor,
                                identity: torch.Tensor, conditions: torch.Tensor | None,
                                generator: torch.Generator) -> torch.Tensor:
        """Self-supervised loss of one batch of *real* photos (``fl.pretrain_data``):
        redraw each photo with its identity's embedding ``identity`` (B, personal_dim)
        from what a real photo offers (its scrambled frame, or ``conditions``)."""

    def fit_personal(self, model: nn.Module, tensors: tuple[torch.Tensor, ...], steps: int,
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
            n = len(tensors[0])
            idx = torch.randint(n, (min(batch_size, n),), generator=generator)
            loss = self.device_loss(model, *(t[idx] for t in tensors))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
