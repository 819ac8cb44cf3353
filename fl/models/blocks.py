"""Building blocks shared by fedface's generators (swap and portrait).

Both generators are one design: a **styled U-Net decoder**. It draws from
*structure* maps at every scale (where things are: pose, expression, light,
scene) and a *style* vector that reaches every scale through FiLM (whose face:
the personal identity embedding, plus the requested controls for the portrait).

* Swap: the structure maps are the clip frame's own features at full, 1/2, 1/4
  and 1/8 resolution (U-Net skips from ``UNetEncoder``), so eyes, mouth, hair
  line and background keep the frame's geometry. The identity must come from the
  embedding: the pretraining teaches that with swap pairs (a frame of person A,
  the target person B under the same attributes), so copying A through the skips
  is penalised.
* Portrait: the structure maps come from ``ControlField``, a per-pixel network of
  the pixel's coordinates and the requested controls (a coordinate-conditioned
  generator), so a yaw moves the eyes and nose and a smile bends the mouth where
  they are drawn, not only through a global code.

Only DP-compatible layers: GroupNorm, no BatchNorm (per-sample gradients need
samples to be independent), checked by Opacus' ModuleValidator in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PERSONAL_PREFIX = "personal."


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


def scale_channels(width: int) -> list[int]:
    """Channels at full, 1/2, 1/4 and 1/8 resolution for a generator of ``width``."""
    return [max(width // 2, 4), width, width * 2, width * 4]


class ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            nn.GroupNorm(_groups(c_out), c_out),
            nn.SiLU(),
        )


class UNetEncoder(nn.Module):
    """Frame -> feature maps at full, 1/2, 1/4 and 1/8 resolution (the U-Net skips)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        chans = scale_channels(width)
        self.blocks = nn.ModuleList([ConvBlock(3, chans[0])] + [
            ConvBlock(chans[i - 1], chans[i], stride=2) for i in range(1, len(chans))])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, maps = x * 2.0 - 1.0, []
        for block in self.blocks:
            h = block(h)
            maps.append(h)
        return maps


class FiLMBlock(nn.Module):
    """Convolve (structure), normalise, then scale/shift by the style (FiLM)."""

    def __init__(self, c_in: int, c_out: int, style_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(_groups(c_out), c_out)
        self.film = nn.Linear(style_dim, 2 * c_out)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(h))
        scale, shift = self.film(style)[:, :, None, None].chunk(2, dim=1)
        return self.act(h * (1.0 + scale) + shift)


class StyledUNetDecoder(nn.Module):
    """(structure maps at 4 scales, style) -> image in [0, 1].

    ``blocks[0]`` works at 1/8 resolution; each later block upsamples, joins the
    structure map of its scale and is modulated by the style; ``blocks[3]`` and
    ``out`` draw at full resolution (the part devices fine-tune by default).
    ``extra_skip`` channels join the full-resolution structure map (the swap's raw frame).
    """

    def __init__(self, width: int, style_dim: int, extra_skip: int = 0) -> None:
        super().__init__()
        chans = scale_channels(width)
        self.blocks = nn.ModuleList([
            FiLMBlock(chans[3], chans[3], style_dim),
            FiLMBlock(chans[3] + chans[2], chans[2], style_dim),
            FiLMBlock(chans[2] + chans[1], chans[1], style_dim),
            FiLMBlock(chans[1] + chans[0] + extra_skip, chans[0], style_dim),
        ])
        self.out = nn.Conv2d(chans[0], 3, 3, padding=1)

    def forward(self, structure: list[torch.Tensor], style: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](structure[3], style)
        for block, skip in zip(self.blocks[1:], reversed(structure[:3]), strict=True):
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skip], dim=1), style)
        return torch.sigmoid(self.out(h))


class ControlField(nn.Module):
    """(conditions, identity) -> structure maps at 4 scales, drawn per pixel.

    Each pixel sees its own coordinates and the requested conditions (with the
    identity) through a small MLP, as in coordinate-conditioned generators; its
    first layer is split into a projection of the coordinates plus one of the
    conditions, which is the same function at a fraction of the cost. A requested
    yaw or smile therefore moves features *where* they are drawn, at every scale.
    """

    def __init__(self, image_size: int, width: int, cond_dim: int, hidden: int) -> None:
        super().__init__()
        self.image_size = image_size
        chans = scale_channels(width)
        self.coords = nn.ModuleList([nn.Conv2d(2, hidden, 1) for _ in chans])
        self.conds = nn.ModuleList([nn.Linear(cond_dim, hidden) for _ in chans])
        self.fields = nn.ModuleList([
            nn.Sequential(nn.Conv2d(hidden, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, c, 1),
                          nn.GroupNorm(_groups(c), c), nn.SiLU())
            for c in chans])

    def forward(self, cond: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for k, field in enumerate(self.fields):
            side = self.image_size // 2**k
            axis = (torch.arange(side, dtype=cond.dtype, device=cond.device) + 0.5) / side * 2 - 1
            ys, xs = torch.meshgrid(axis, axis, indexing="ij")
            coords = self.coords[k](torch.stack([xs, ys])[None])
            h = F.silu(coords + self.conds[k](cond)[:, :, None, None])
            maps.append(field(h))
        return maps


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
