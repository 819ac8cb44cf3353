"""Building blocks shared by fedface's generators (swap and portrait).

A generator draws *whose* face from a personal identity embedding that reaches
every scale through FiLM, and *what* (pose, expression, light, scene) from a
code: an encoded clip frame for the swap, requested controls for the portrait.
Only DP-compatible layers: GroupNorm, no BatchNorm (per-sample gradients need
samples to be independent), checked by Opacus' ModuleValidator in the tests.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

PERSONAL_PREFIX = "personal."


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


class DownBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
            nn.GroupNorm(_groups(c_out), c_out),
            nn.SiLU(),
        )


class FiLMUpBlock(nn.Module):
    """Upsample, convolve, normalise, then scale/shift by the identity (FiLM)."""

    def __init__(self, c_in: int, c_out: int, id_dim: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(_groups(c_out), c_out)
        self.film = nn.Linear(id_dim, 2 * c_out)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(self.up(h)))
        scale, shift = self.film(identity)[:, :, None, None].chunk(2, dim=1)
        return self.act(h * (1.0 + scale) + shift)


class Decoder(nn.Module):
    """(code, identity) -> image in [0, 1]."""

    def __init__(self, image_size: int, width: int, code_dim: int, id_dim: int) -> None:
        super().__init__()
        self.side = image_size // 16
        self.c0 = width * 4
        self.stem = nn.Linear(code_dim + id_dim, self.c0 * self.side * self.side)
        chans = [width * 4, width * 4, width * 2, width, width]
        self.blocks = nn.ModuleList(
            [FiLMUpBlock(a, b, id_dim) for a, b in itertools.pairwise(chans)]
        )
        self.out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, code: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat([code, identity], dim=1))
        h = h.view(-1, self.c0, self.side, self.side)
        for block in self.blocks:
            h = block(h, identity)
        return torch.sigmoid(self.out(h))


class PersonalIdentity(nn.Module):
    """The user's identity embedding: the part that can draw this user's face.

    An ``nn.Embedding`` with a single row (looked up with index 0 for every
    sample) rather than a bare parameter, so that Opacus computes its per-sample
    gradients with its own well-tested Embedding sampler and clips it *jointly*
    with the shared weights.
    """

    def __init__(self, id_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(1, id_dim)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, batch_size: int, device: torch.device) -> torch.Tensor:
        index = torch.zeros(batch_size, dtype=torch.long, device=device)
        return self.embedding(index)
