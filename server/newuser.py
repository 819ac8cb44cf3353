"""Server-side new-user check: how good is the shared model for someone new?

A fresh personal part is fitted for a fixed small number of steps on the frozen
current shared weights, for public identities that pretraining never saw, and
the task's primary metric is measured. It isolates the quality of the *shared*
weights from the devices' personal parts, using public data only.
"""

from __future__ import annotations

import numpy as np
import torch

from fl.data.device_data import DeviceData
from fl.data.fleet import PUBLIC_ID_OFFSET, FleetSpec, synthetic_device
from fl.device import place, resolve
from fl.tasks.base import Task

PHOTOS_PER_NEW_USER = 24


def fit_new_user(task: Task, shared: dict[str, torch.Tensor],
                 personal_init: dict[str, torch.Tensor], spec: FleetSpec, k: int, steps: int,
                 seed: int = 0, device: str = "cpu") -> tuple[torch.nn.Module, DeviceData]:
    """The shared model with a personal part fitted to the k-th new public user,
    computed on ``device`` (the run's ``device`` key, ``fl.device``)."""
    # Public identities after the pretraining ones: never seen by the shared weights.
    data = synthetic_device(spec, PUBLIC_ID_OFFSET + spec.num_public + k, PHOTOS_PER_NEW_USER)
    model = task.build_model(spec.image_size)
    model.load_state_dict({**shared, **personal_init})
    place(resolve(device), model)
    task.fit_personal(model, task.training_tensors(data), steps, seed=seed + k)
    return model, data


def newuser_score(task: Task, shared: dict[str, torch.Tensor],
                  personal_init: dict[str, torch.Tensor], spec: FleetSpec,
                  identities: int, steps: int, seed: int = 0, device: str = "cpu") -> float:
    """Mean ``task.primary_metric`` of ``identities`` new public users."""
    scores = []
    for k in range(identities):
        model, data = fit_new_user(task, shared, personal_init, spec, k, steps, seed, device)
        scores.append(task.evaluate_device(model, data, spec)[task.primary_metric])
    return float(np.mean(scores))
