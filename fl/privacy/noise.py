"""Where DP randomness comes from: ``privacy.noise`` = ``secure`` or ``seeded``.

A Gaussian mechanism protects only against a party that cannot reproduce its
noise. fedface draws DP noise in two places (photo-level on each device, inside
Opacus' DP-SGD, together with the Poisson sampling masks; user-level on the
server, in DP-FedAvg) and offers two sources for both:

* ``secure``: every generator is seeded with 64 bits from the operating system
  (``secrets``, i.e. ``os.urandom``), drawn where the noise is drawn and never
  stored, sent or logged. Neither the server (for a device's noise) nor anyone
  holding the run's config and two consecutive models (for the server's noise)
  can rebuild it. Gaussian draws also use the floating-point attack mitigation
  Opacus applies in its ``secure_mode`` (below).
* ``seeded``: generators are seeded from the run's public ``seed`` and the round
  (and device), so a simulation is reproducible to the last digit. Its epsilons
  hold only against parties that do not know the seed; the seed is an MLflow
  param. Real devices refuse it (``clients.app``), and so does ``data=device``.

Why not Opacus ``PrivacyEngine(secure_mode=True)``: it requires ``torchcsprng``,
whose last release (0.2.1, 2021) is built for torch 1.8 and does not install with
the torch fedface pins. fedface therefore passes Opacus a torch generator seeded
from ``os.urandom`` (as the noise generator and the Poisson sampler's generator)
and switches on the DP optimizer's own ``secure_mode`` flag, which is the part of
Opacus' secure mode that changes how noise is drawn. What that leaves: torch's
CPU generator is a Mersenne Twister, not a CSPRNG. Its 64-bit seed cannot be
guessed, but in principle its state could be inferred from enough *raw* outputs;
an observer never sees raw outputs, only their sum with clipped gradients, so no
known attack applies. docs/privacy.md says the same.

The floating-point mitigation (Holohan and Braghin 2021, section 5.1; the attack
on Opacus is Haney et al. 2022): the low-order bits of one floating-point
Gaussian sample can reveal which value it was added to. Summing ``2n = 4``
independent draws of standard deviation ``std`` and dividing by ``sqrt(4) = 2``
keeps the distribution N(0, std^2) while making that inference cost ~2^159.
"""

from __future__ import annotations

import secrets

import torch

NOISE_MODES = ("secure", "seeded")
SECURE, SEEDED = NOISE_MODES

# Said wherever a seeded run's guarantees are shown (report, console, MLflow tag).
SEEDED_CAVEAT = ("noise is SEEDED from the run's public seed: the epsilons hold only "
                 "against parties that do not know the seed (it is an MLflow param). "
                 "Use privacy.noise=secure for guarantees against the server and readers "
                 "of MLflow.")


def check_mode(mode: str) -> str:
    if mode not in NOISE_MODES:
        raise ValueError(f"privacy.noise={mode!r}: choose one of {list(NOISE_MODES)}")
    return mode


def _seed_from(parts: tuple[int, ...]) -> int:
    """A seed from public integers; ``hash`` of a tuple of ints is stable across
    processes (no hash randomisation for ints)."""
    return hash(tuple(int(p) for p in parts)) % 2**63


def generator(mode: str, *seed_parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one use (one DP-SGD run, one server release), on ``device``
    (noise is drawn where the tensor it is added to lives: a CUDA gradient needs a
    CUDA generator).

    ``seeded``: seeded from ``seed_parts`` (the run seed, the round, the device).
    ``secure``: seeded from 64 bits of OS randomness; ``seed_parts`` are ignored.
    """
    seed = secrets.randbits(64) if check_mode(mode) == SECURE else _seed_from(seed_parts)
    return torch.Generator(device=device).manual_seed(seed)


def gaussian(shape: torch.Size | tuple[int, ...], std: float, gen: torch.Generator,
             mode: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """N(0, std^2) noise of ``shape``; under ``secure``, drawn as Opacus' secure
    mode does (one discarded draw, then the mean of four draws times 2)."""
    if std <= 0:
        return torch.zeros(shape, dtype=dtype)
    if check_mode(mode) == SEEDED:
        return torch.normal(0.0, std, size=tuple(shape), generator=gen, dtype=dtype)
    torch.normal(0.0, std, size=(1, 1), generator=gen, dtype=dtype)  # discarded, as Opacus
    total = torch.zeros(shape, dtype=dtype)
    for _ in range(4):
        total += torch.normal(0.0, std, size=tuple(shape), generator=gen, dtype=dtype)
    return total / 2
