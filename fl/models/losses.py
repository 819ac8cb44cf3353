"""Training losses of the generators: pixel error plus a structural term.

Why not MSE alone: the features that make a face recognisable (eyes, brows, mouth,
the glasses' rims) cover a few pixels each at 32x32, so their share of a mean
squared error is tiny and a generator that draws a smooth, well-coloured oval is
already near the MSE optimum (what the previous generators drew). The structural
term (1 - SSIM, Gaussian window 11, sigma 1.5, as in ``fl.metrics``) is computed
from local means, variances and covariances, so a missing eye costs as much as a
wrong cheek colour. Differentiable, per-sample (usable under DP-SGD).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_C1, _C2 = 0.01**2, 0.03**2


def _window(channels: int, sigma: float = 1.5, size: int = 11) -> torch.Tensor:
    axis = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(axis**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM over the valid region (no padding), ``(N, C, H-10, W-10)``."""
    w = _window(pred.shape[1]).to(pred)
    c = pred.shape[1]
    mu_p, mu_t = F.conv2d(pred, w, groups=c), F.conv2d(target, w, groups=c)
    var_p = F.conv2d(pred * pred, w, groups=c) - mu_p**2
    var_t = F.conv2d(target * target, w, groups=c) - mu_t**2
    cov = F.conv2d(pred * target, w, groups=c) - mu_p * mu_t
    return ((2 * mu_p * mu_t + _C1) * (2 * cov + _C2)
            / ((mu_p**2 + mu_t**2 + _C1) * (var_p + var_t + _C2)))


def generator_loss(pred: torch.Tensor, target: torch.Tensor,
                   structure_weight: float = 0.1) -> torch.Tensor:
    """MSE + ``structure_weight`` x (1 - SSIM), both means over the batch."""
    mse = F.mse_loss(pred, target)
    if structure_weight == 0:
        return mse
    return mse + structure_weight * (1.0 - ssim_map(pred, target).mean())
