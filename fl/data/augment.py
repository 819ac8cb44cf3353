"""Scrambled frames: the bottleneck of self-supervised swap pretraining on real photos.

On real photos there is no ground truth of identity A under B's frame, so a swap
model learns by redrawing a photo from *its own* frame with its identity's
embedding (DeepFaceLab's autoencoders learn the same way). Given the clean frame,
a U-Net could copy it through its skips and never use the embedding. The frame it
is given is therefore scrambled in what makes the face *this person's* and kept in
what a swap must carry over:

* colour: the channels are permuted and each scaled by a random gain (0.6-1.4),
  so skin, hair and eye colour must come from the identity embedding;
* geometry: a small random warp (rotation up to 8 degrees, scale 0.92-1.08, shift
  up to 5% of the side; DeepFaceLab warps its inputs the same way), so the exact
  outline and features must be redrawn, not copied, while pose, expression and
  light still show.

The target is the clean photo.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GAIN = (0.6, 1.4)
ROTATION = math.radians(8.0)
SCALE = (0.92, 1.08)
SHIFT = 0.05 * 2  # in grid units ([-1, 1] spans the side)


def scramble(photos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``photos`` (N, 3, S, S) in [0, 1] with colours and geometry scrambled per photo."""
    n = photos.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    order = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)])
    coloured = torch.gather(photos, 1, order[:, :, None, None].expand_as(photos))
    coloured = (coloured * uniform(*GAIN, n, 3, 1, 1)).clamp(0, 1)
    angle, scale = uniform(-ROTATION, ROTATION, n), uniform(*SCALE, n)
    shift = uniform(-SHIFT, SHIFT, n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(photos.shape), align_corners=False)
    return F.grid_sample(coloured, grid, padding_mode="border", align_corners=False)
