"""Simulated faulty devices: which devices misbehave, and how (``faults.*``).

A research feature for robustness studies, and how the tests play a hostile
fleet: ``faults.share`` of the simulated devices misbehave, each in one of
``faults.kinds``. The choice is a pure function of the run's seed and the
device's index, so the device (which acts it out, ``clients.faults``) and a test
(which predicts the counts) agree without the server telling anyone. The server
learns nothing from this module: it has to catch the faults as it would catch a
real hostile device's. Simulation only: ``data=device`` refuses faults, and a
real device refuses a recipe that asks for them.
"""

from __future__ import annotations

import numpy as np

# Replies the server must reject (the reply is invalid)...
INVALID = ("nan", "inf", "wrong_shape", "missing_key", "extra_key", "bad_metrics",
           "claimed_examples")
# ...devices that never answer (counted as failed)...
ABSENT = ("crash", "hang")
# ...and valid-looking updates that push the model away (bounded by the user-level
# clip or ``strategy.update_norm_bound``, never detectable one by one).
HOSTILE = ("huge_norm", "flip_sign")
KINDS = INVALID + ABSENT + HOSTILE

HUGE_FACTOR = 1e6  # huge_norm: the update times this (finite in float32 for our weights)
FLIP_FACTOR = 10.0  # flip_sign: the update times -this


def assignment(seed: int, num_devices: int, share: float, kinds: list[str] | tuple[str, ...]
               ) -> dict[int, str]:
    """Device index -> fault kind for the faulty devices of a fleet.

    round(share * N) devices, drawn with a generator of their own (so turning
    faults on changes nothing else), get the kinds in turn: every kind appears as
    soon as there are at least as many faulty devices as kinds."""
    count = round(share * num_devices) if kinds else 0
    if count == 0:
        return {}
    order = np.random.default_rng([int(seed), 0xFA17]).permutation(num_devices)[:count]
    return {int(device): kinds[i % len(kinds)] for i, device in enumerate(order)}


def describe(share: float, kinds: list[str] | tuple[str, ...]) -> str:
    """The ``fedface.faults`` tag: ``none``, or the share and kinds."""
    if not share or not kinds:
        return "none"
    return f"share={share:g} kinds={','.join(kinds)}"
