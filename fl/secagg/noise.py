"""A device's share of the user-level noise (``privacy.user.noise_at=devices``),
drawn from the operating system's CSPRNG.

Why not ``fl.privacy.noise``: its generators are torch's Mersenne Twister, seeded
(from ``privacy.seed`` or 64 OS bits). Here the noise is what stands between the
server and the noiseless sum, so it must come from a source the server cannot
rebuild or predict, whatever ``privacy.noise`` says: every uniform is read from
``os.urandom`` (the kernel's CSPRNG), never seeded, stored or sent, and each call
draws afresh (a replayed round gets new noise). Uniforms become Gaussians by the
Box-Muller transform; as in ``fl.privacy.noise`` under ``secure``, each value is
the sum of four draws divided by two (same distribution, against the
floating-point attack of Haney et al. 2022 on single samples).
"""

from __future__ import annotations

import os

import numpy as np

DRAWS = 4  # Gaussians summed per value (their sum divided by sqrt(DRAWS))


def _uniforms(count: int) -> np.ndarray:
    """``count`` uniforms in (0, 1) with 53 random bits each, from ``os.urandom``."""
    words = np.frombuffer(os.urandom(8 * count), dtype="<u8")
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def gaussian(size: int, std: float) -> np.ndarray:
    """``size`` independent N(0, std^2) values (float64)."""
    if not (np.isfinite(std) and std >= 0):
        raise ValueError(f"noise std {std!r} is not a number >= 0")
    half = (DRAWS * size + 1) // 2
    u1, u2 = _uniforms(half), _uniforms(half)
    radius = np.sqrt(-2.0 * np.log(u1))
    normal = np.concatenate([radius * np.cos(2 * np.pi * u2),
                             radius * np.sin(2 * np.pi * u2)])[:DRAWS * size]
    return normal.reshape(size, DRAWS).sum(axis=1) / np.sqrt(DRAWS) * std
