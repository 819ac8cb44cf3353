"""Portrait generator: the user's face under requested controls.

Portrait = decoder(control field, style). The shared ``controls`` field turns each
pixel's coordinates, the requested controls (yaw, pitch, smile, light direction),
the backdrop colour and the identity into structure maps at four scales, so a
requested yaw moves the eyes and nose and a smile bends the mouth where they are
drawn. The shared styled U-Net decoder (the same design as the swap model,
``fl.models.blocks``) is modulated at every scale by the identity and a code of
the controls. The personal identity embedding says *whose* face. Optionally a
small personal **adapter** (a 1x1 colour transform of the output, initialised to
the identity) lets a device correct its camera's colour and tone without touching
shared weights. Both personal pieces live under ``personal.`` and never leave the
device.
"""

from __future__ import annotations

import torch
from torch import nn

from fl.data.controls import NUM_CONDITIONS
from fl.models.blocks import ControlField, PersonalIdentity, StyledUNetDecoder


class PersonalPortrait(PersonalIdentity):
    """Identity embedding plus, optionally, a per-user 1x1 colour adapter."""

    def __init__(self, id_dim: int, adapter: bool) -> None:
        super().__init__(id_dim)
        self.adapter = nn.Conv2d(3, 3, 1) if adapter else None
        if self.adapter is not None:
            with torch.no_grad():
                self.adapter.weight.copy_(torch.eye(3)[:, :, None, None])
                self.adapter.bias.zero_()

    def adapt(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.adapter is None else self.adapter(image)


class PortraitModel(nn.Module):
    """Shared ``controls`` field and ``decoder``; personal ``personal``."""

    def __init__(self, image_size: int, width: int = 32, code_dim: int = 32, id_dim: int = 32,
                 hidden: int = 64, adapter: bool = False) -> None:
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image size must be a multiple of 16, got {image_size}")
        self.controls = ControlField(image_size, width, NUM_CONDITIONS + id_dim, hidden)
        self.code = nn.Sequential(nn.Linear(NUM_CONDITIONS, hidden), nn.SiLU(),
                                  nn.Linear(hidden, code_dim))
        self.decoder = StyledUNetDecoder(width, code_dim + id_dim)
        self.personal = PersonalPortrait(id_dim, adapter)

    def draw(self, conditions: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """Any identity vector under ``conditions`` (pretraining uses public ones)."""
        structure = self.controls(torch.cat([conditions, identity], dim=1))
        style = torch.cat([self.code(conditions), identity], dim=1)
        return self.personal.adapt(self.decoder(structure, style))

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        """This device's user under each row of ``conditions`` (``fl.data.controls``)."""
        return self.draw(conditions, self.personal(conditions.shape[0], conditions.device))
