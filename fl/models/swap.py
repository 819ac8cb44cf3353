"""Face-swap generator: shared U-Net encoder and styled decoder + a small personal part.

Swap = decoder(encoder(clip frame) at four scales, personal identity of the user).
The encoder's maps carry the frame's structure at full resolution (pose,
expression, light, scene: where the eyes, mouth and hair line are); the decoder
draws *whose* face from an identity embedding that it receives through FiLM at
every scale (skin, eyes, hair, glasses). The previous design squeezed the frame
through a 2x2, 32-number code, and the decoder could not recover the detail.

Why this split: DeepFaceLab-style one-decoder-per-user learns far too slowly when
a device trains a few DP-SGD steps per round. A small personal embedding on a
shared generator is learnt in a single participation, and it is the only part
that can draw the user's face, so it never leaves the device.
"""

from __future__ import annotations

import torch
from torch import nn

from fl.models.blocks import PERSONAL_PREFIX, PersonalIdentity, StyledUNetDecoder, UNetEncoder

__all__ = ["PERSONAL_PREFIX", "SwapModel"]


class SwapModel(nn.Module):
    """The on-device model: shared ``encoder`` and ``decoder``, personal ``personal``."""

    def __init__(self, image_size: int, width: int = 32, id_dim: int = 32):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image size must be a multiple of 16, got {image_size}")
        self.encoder = UNetEncoder(width)
        self.decoder = StyledUNetDecoder(width, id_dim, extra_skip=3)
        self.personal = PersonalIdentity(id_dim)

    def draw(self, frames: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """Any identity vector into ``frames`` (pretraining uses public ones).

        The raw frame joins the full-resolution skip, so what the swap keeps
        unchanged (the scene around the head) is a copy from the first step on."""
        structure = self.encoder(frames)
        structure[0] = torch.cat([structure[0], frames * 2.0 - 1.0], dim=1)
        return self.decoder(structure, identity)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Draw this device's user with each frame's pose, expression, light, scene."""
        return self.draw(frames, self.personal(frames.shape[0], frames.device))
