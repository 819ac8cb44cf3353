"""DP-FedAvg aggregation: clip each device's update, sum, add Gaussian noise.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: it hands the
clipped updates to the inner strategy's *weighted* average (by example count),
and a weighted mean has no fixed per-user sensitivity. Here every device counts
once: the released quantity is

    global + (sum_i clip_C(update_i) + N(0, (sigma * C * scale)^2)) / denominator

over exactly the coordinates devices are allowed to train (``keys``); any other
value a device sends is ignored, so the guarantee holds whatever a device
computes. ``scale`` is 1 except in a simulated cohort, where the noise is that of
a larger cohort (``cohort / simulated cohort``).

Updates must be finite: ``min(1, C / nan)`` is 1, so a NaN would pass clipping
unchanged. ``fl.privacy.release`` screens every update before it gets here, and
this function refuses a non-finite one as a last line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fl.privacy import noise as N


@dataclass(frozen=True)
class Aggregate:
    state: dict[str, torch.Tensor]
    clip_fraction: float  # share of updates whose norm exceeded the clip
    update_norms: tuple[float, ...]


def dp_fedavg(global_state: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
              keys: list[str], clip: float, noise_multiplier: float, denominator: float,
              generator: torch.Generator, noise_mode: str,
              noise_scale: float = 1.0) -> Aggregate:
    if clip <= 0 or denominator <= 0:
        raise ValueError("clip and denominator must be positive")
    total = {k: torch.zeros_like(global_state[k], dtype=torch.float64) for k in keys}
    norms, clipped = [], 0
    for update in updates:
        delta = {k: update[k].to(torch.float64) - global_state[k].to(torch.float64)
                 for k in keys}
        norm = torch.sqrt(sum((d * d).sum() for d in delta.values())).item()
        if not math.isfinite(norm):
            raise ValueError("a non-finite update reached DP-FedAvg; screen updates first "
                             "(fl.privacy.release.screen)")
        norms.append(norm)
        factor = min(1.0, clip / (norm + 1e-12))
        clipped += factor < 1.0
        for k in keys:
            total[k] += delta[k] * factor
    state = noised_sum(global_state, total, keys, clip, noise_multiplier, denominator,
                       generator, noise_mode, noise_scale)
    return Aggregate(state, clipped / len(updates) if updates else 0.0, tuple(norms))


def noised_sum(global_state: dict[str, torch.Tensor], total: dict[str, torch.Tensor],
               keys: list[str], clip: float, noise_multiplier: float, denominator: float,
               generator: torch.Generator, noise_mode: str,
               noise_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``global + (total + N(0, (sigma C scale)^2)) / denominator`` over ``keys``, from
    the sum of clipped updates. Secure aggregation hands its unmasked sum here
    directly; the noise is drawn in the same order as for ``dp_fedavg``, so with
    seeded noise both paths add the same noise."""
    if clip <= 0 or denominator <= 0:
        raise ValueError("clip and denominator must be positive")
    std = noise_multiplier * clip * noise_scale
    state = dict(global_state)
    for k in keys:
        noise = N.gaussian(total[k].shape, std, generator, noise_mode)
        mean = (total[k].to(torch.float64) + noise) / denominator
        state[k] = (global_state[k].to(torch.float64) + mean).to(global_state[k].dtype)
    return state
