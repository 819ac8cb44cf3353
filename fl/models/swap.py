"""Face-swap generator: shared encoder + shared decoder + a small personal part.

Swap = decoder(encoder(clip frame), personal identity of the user). The encoder
maps a frame to a compact code of what varies between photos (pose, expression,
light, scene); the decoder draws *whose* face from an identity embedding that it
receives through FiLM at every scale.

Why this split: DeepFaceLab-style one-decoder-per-user learns far too slowly when
a device trains a few DP-SGD steps per round. A small personal embedding on a
shared generator is learnt in a single participation, and it is the only part
that can draw the user's face, so it never leaves the device.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from fl.models.blocks import PERSONAL_PREFIX, Decoder, DownBlock, PersonalIdentity

__all__ = ["PERSONAL_PREFIX", "Encoder", "SwapModel"]


class Encoder(nn.Module):
    """Frame -> code of pose, expression, light and scene (identity-free by training)."""

    def __init__(self, image_size: int, width: int, code_dim: int) -> None:
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 4]
        self.blocks = nn.Sequential(*[DownBlock(a, b) for a, b in itertools.pairwise(chans)])
        side = image_size // 16
        self.head = nn.Linear(chans[-1] * side * side, code_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x * 2.0 - 1.0).flatten(1))


class SwapModel(nn.Module):
    """The on-device model: shared ``encoder`` and ``decoder``, personal ``personal``."""

    def __init__(self, image_size: int, width: int = 32, code_dim: int = 32, id_dim: int = 32):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image size must be a multiple of 16, got {image_size}")
        self.encoder = Encoder(image_size, width, code_dim)
        self.decoder = Decoder(image_size, width, code_dim, id_dim)
        self.personal = PersonalIdentity(id_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Draw this device's user with each frame's pose, expression, light, scene."""
        identity = self.personal(frames.shape[0], frames.device)
        return self.decoder(self.encoder(frames), identity)
