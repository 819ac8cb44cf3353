"""Portrait conditions of photos whose controls nobody labelled, fitted per photo.

A real photo has a measurable backdrop (its border, ``fl.data.controls.backdrop``)
and an estimable light direction (``light_from_images``), but its yaw, pitch and
smile are unknown unless a CSV or landmarks say so. Where they are unknown, they
are fitted per photo alongside the identity, by the same gradient steps that fit
the identity (analysis by synthesis: the controls under which the generator
redraws that photo best), starting from a frontal, half-smiling face and kept in
their ranges. Enrollment (``experiments.enroll``) and pretraining on unlabelled
real photos (``fl.pretrain_data``) both use this.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fl.data.controls import backdrop, conditions, light_from_images

FITTED = 3  # yaw, pitch, smile: the leading control columns fitted when unlabelled
LOW = torch.tensor([-1.0, -1.0, 0.0])
HIGH = torch.tensor([1.0, 1.0, 1.0])
START = (0.0, 0.0, 0.5)


def known_conditions(photos: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Conditions with what is known: labels, or the starting yaw, pitch and smile
    and the estimated light; the backdrop measured. ``(N, NUM_CONDITIONS)``."""
    known = labels if labels is not None else np.concatenate(
        [np.tile(np.asarray(START, np.float32), (len(photos), 1)), light_from_images(photos)],
        axis=1)
    return conditions(known, backdrop(photos))


class PhotoConditions(nn.Module):
    """Each photo's conditions, indexed by photo: fixed where labelled; with yaw,
    pitch and smile as parameters where not (``fit=True``)."""

    def __init__(self, known: np.ndarray, fit: bool) -> None:
        super().__init__()
        self.register_buffer("fixed", torch.from_numpy(np.asarray(known, np.float32)))
        self.fitted = nn.Parameter(self.fixed[:, :FITTED].clone(), requires_grad=fit)

    @classmethod
    def of(cls, photos: np.ndarray, labels: np.ndarray | None) -> PhotoConditions:
        return cls(known_conditions(photos, labels), fit=labels is None)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        fitted = torch.maximum(torch.minimum(self.fitted[index], HIGH.to(self.fixed.device)),
                               LOW.to(self.fixed.device))
        return torch.cat([fitted, self.fixed[index, FITTED:]], dim=1)
