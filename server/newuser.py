"""Server-side new-user check: how good is the shared model for someone new?

A fresh personal part is fitted for a fixed small number of steps on the frozen
current shared weights, for public identities that pretraining never saw, and
their swap PSNR is measured. It isolates the quality of the *shared* weights
from the devices' personal parts, using public data only.
"""

from __future__ import annotations

import numpy as np
import torch

from fl.data.fleet import DevicePhotos, FleetSpec, public_attributes, public_identity
from fl.data.synthfaces import render
from fl.tasks.base import Task

PHOTOS_PER_NEW_USER = 24


def newuser_swap_psnr(task: Task, shared: dict[str, torch.Tensor],
                      personal_init: dict[str, torch.Tensor], spec: FleetSpec,
                      identities: int, steps: int, seed: int = 0) -> float:
    scores = []
    for k in range(identities):
        public_index = spec.num_public + k  # after the pretraining identities
        identity = public_identity(spec, public_index)
        attrs = [public_attributes(spec, public_index, i)
                 for i in range(PHOTOS_PER_NEW_USER + spec.heldout_photos)]
        images = render(identity, attrs, spec.image_size)
        photos = DevicePhotos(identity, images[:PHOTOS_PER_NEW_USER],
                              images[PHOTOS_PER_NEW_USER:], tuple(attrs[PHOTOS_PER_NEW_USER:]))
        model = task.build_model(spec.image_size)
        model.load_state_dict({**shared, **personal_init})
        task.fit_personal(model, torch.from_numpy(photos.train), steps, seed=seed + k)
        scores.append(task.evaluate_device(model, photos, spec)["swap_psnr"])
    return float(np.mean(scores))
