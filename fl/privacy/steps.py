"""How many DP-SGD steps a device takes per participation, in one place.

The server calibrates the photo-level noise for this count (``fl.privacy.plan``)
and the device trains and accounts exactly this count (``clients.trainer``); both
import it from here, a module light enough for the device process (no Opacus
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


def steps_per_participation(epochs: float, personal_epochs: float, batches: int,
                            trains_shared: bool = True) -> int:
    """Steps of one participation as ``clients.trainer.phases`` runs them: with
    ``personal_epochs``, a personal phase, then (when the device trains shared
    weights) a shared one of ``epochs``; without, one joint phase of ``epochs``."""
    if personal_epochs <= 0:
        return phase_steps_of(epochs, batches)
    shared = phase_steps_of(epochs, batches) if trains_shared and epochs > 0 else 0
    return phase_steps_of(personal_epochs, batches) + shared
