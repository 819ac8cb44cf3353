"""From a float update to a field element and back: the bounds that keep the
user-level sensitivity at C after quantization.

A device clips its update (the device-trained shared weights minus the weights it
was sent) to L2 norm ``C - step * (sqrt(d) + 1)``, with step = 2C/T the width of one
quantization level, then quantizes each coordinate with Flower's stochastic
rounding (``flwr.common.secure_aggregation.quantization.quantize``, range [-C, C]
onto the integers 0..T). Rounding moves a coordinate by less than one step, so the
quantized update, read back as floats, has norm at most C: the sum's sensitivity
to one device is C exactly, and the accountant is unchanged. Each coordinate lies
in [-C, C], so Flower's per-coordinate clip to [-C, C] never acts.

Error: stochastic rounding is unbiased, each device's coordinate is off by less
than one step (variance at most step**2 / 4), so a sum of n updates is off by less
than n * step per coordinate (standard deviation at most sqrt(n) * step / 2);
the shrunken clip moves a clipped update by at most step * (sqrt(d) + 1) in L2.
At n = 100 (T = 2**24) and C = 0.1 a step is 1.2e-8.

Distributed noise (``privacy.user.noise_at=devices``): the range is [-R, R] with
R = C + 10 noise std (``Params.quantization_range``), step = 2R/T, and the same
clip ``C - step * (sqrt(d) + 1)`` keeps the update's part at norm <= C. The noise
is quantized on its own (``quantize_noise``): it never depends on the update, so
the sum is the quantized updates' sum (sensitivity C, as above) plus the devices'
rounded noise; truncating the noise at R - C - 2 step keeps every sent coordinate
in 0..T.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize


def step(clip: float, target_range: int) -> float:
    """Width of one quantization level."""
    return 2.0 * clip / target_range


def device_clip(clip: float, target_range: int, dimension: int,
                quant_range: float | None = None) -> float:
    """The L2 norm a device clips to, so that its quantized update stays within C
    (levels over [-quant_range, quant_range], by default [-C, C])."""
    width = step(clip if quant_range is None else quant_range, target_range)
    return clip - width * (math.sqrt(dimension) + 1.0)


def clip_and_quantize(delta: np.ndarray, clip: float, target_range: int,
                      quant_range: float | None = None) -> np.ndarray:
    """A device's update as integers 0..T (int64), its L2 norm bounded first."""
    delta = np.asarray(delta, dtype=np.float64).reshape(-1)
    if not np.isfinite(delta).all():
        raise ValueError("the update is not finite")
    quant_range = clip if quant_range is None else quant_range
    bound = device_clip(clip, target_range, delta.size, quant_range)
    norm = float(np.linalg.norm(delta))
    if norm > bound:
        delta = delta * (bound / norm)
    (quantized,) = quantize([delta], quant_range, target_range)
    return quantized.astype(np.int64)


def quantize_noise(noise: np.ndarray, clip: float, target_range: int,
                   quant_range: float) -> np.ndarray:
    """A device's noise as integers centred on 0 (int64): truncated to
    +-(R - C - 2 step), so that added to a quantized update (0..T, its values
    within C of the middle) every coordinate stays in 0..T; stochastic rounding as
    for the update (unbiased, independent of the update)."""
    width = step(quant_range, target_range)
    limit = quant_range - clip - 2 * width
    if limit <= 0:
        raise ValueError("no room for noise in the quantization range")
    truncated = np.clip(np.asarray(noise, dtype=np.float64).reshape(-1), -limit, limit)
    (quantized,) = quantize([truncated], quant_range, target_range)
    return quantized.astype(np.int64) - target_range // 2


def sum_bound(count: int, target_range: int) -> int:
    """The largest coordinate a sum of ``count`` honest quantized updates can have."""
    return count * target_range


def decode_sum(total: np.ndarray, count: int, quant_range: float,
               target_range: int) -> np.ndarray:
    """The float sum of ``count`` quantized updates from their integer sum (each
    quantized value is (x + R) * T / 2R, so the sum carries an offset of count * R;
    R = C without distributed noise)."""
    (values,) = dequantize([np.asarray(total, dtype=np.int64)], quant_range, target_range)
    return values - (count - 1) * quant_range


def error_bound(count: int, clip: float, target_range: int) -> float:
    """Largest per-coordinate difference between the decoded sum and the sum of the
    clipped float updates, from rounding alone."""
    return count * step(clip, target_range)
