"""Which DP-SGD phases a device runs per participation, and how many steps, in one
place.

The server calibrates the photo-level noise for these steps (``fl.privacy.plan``)
and the device trains and accounts exactly these phases (``clients.trainer``); both
import them from here, a module light enough for the device process (no Opacus
accountants, no OmegaConf).
"""

from __future__ import annotations

import math


def opacus_batches(photos: int, batch_size: int) -> int:
    """Batches per epoch as Opacus' DPDataLoader counts them, int(1 / (1 / ceil(n/B))):
    its sample rate is one over this (one less than ceil(n/B) for some n, e.g. 737
    to 744 photos at batch 8, through floating-point rounding). The device trains
    and accounts at exactly this rate (``clients.trainer``)."""
    return int(1 / (1 / math.ceil(photos / batch_size)))


def phase_steps_of(epochs: float, batches: int) -> int:
    """DP-SGD steps of one training phase of ``epochs`` expected passes."""
    return max(1, round(epochs * batches))


def phase_plan(epochs: float, personal_epochs: float,
               trains_shared: bool = True) -> list[tuple[float, bool, bool]]:
    """A participation's DP-SGD phases as (epochs, trains personal, trains shared).

    With ``personal_epochs`` the personal part is fitted alone first, then (when the
    device trains shared weights) the shared weights alone; without, one joint phase
    of ``epochs``. ``clients.trainer`` runs exactly these phases and the server's
    calibration counts their steps (``steps_per_participation``)."""
    if personal_epochs <= 0:
        return [(epochs, True, True)]
    plan = [(personal_epochs, True, False)]
    if trains_shared and epochs > 0:
        plan.append((epochs, False, True))
    return plan


def steps_per_participation(epochs: float, personal_epochs: float, batches: int,
                            trains_shared: bool = True) -> int:
    """DP-SGD steps of one participation: the steps of all its phases."""
    return sum(phase_steps_of(e, batches)
               for e, _, _ in phase_plan(epochs, personal_epochs, trains_shared))
