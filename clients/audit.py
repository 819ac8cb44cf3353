"""The audit's own ClientApp: fedface's device code with canary photos planted,
and (tests only) a bug planted on purpose.

Only ``server.audit`` (``python -m experiments.audit``) builds it; the ClientApp
of every normal run (``clients.app.app``, ``flwr run``) has no way to plant
anything, and no config key turns this on. It runs the very ``train``,
``evaluate`` and roll call of ``clients.app`` with their mods, plus one mod
outermost around ``train``:

* ``canaries``: before the device opens its photos, its included canary photos
  (``fl.audit.canary_photos``) are added to this worker's copy of them
  (``fl.data.device_data.hold``). The coins travel inside the app object,
  never in a message or a log.
* ``planted_bug`` (a test-only hook, ``PLANTED_BUGS``): ``"noise_off"`` makes
  Opacus add zero noise while the device's ledger still records the configured
  noise multiplier, the kind of bug no accountant test can see. The audit must
  then report a lower bound above the theory (``audit/violation=1``).

Simulated devices only: a real device (its own ``data-dir`` or ``state-dir``)
refuses to run this app.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import app as device_app
from clients.device import device_index, is_real_device
from clients.faults import simulated_faults
from fl import protocol as P
from fl.audit.canary_photos import CANARY_PREFIX, Placement, with_canaries
from fl.data.device_data import hold, load_device_data

NOISE_OFF = "noise_off"
PLANTED_BUGS = (NOISE_OFF,)


@contextmanager
def _no_dp_noise():
    """Opacus draws every DP-SGD noise sample through ``_generate_noise``; a
    zero instead is DP-SGD without noise, with the accounting unchanged."""
    from opacus.optimizers import optimizer as opacus_optimizer

    original = opacus_optimizer._generate_noise

    def zeros(std, reference, generator=None, secure_mode=False):
        return torch.zeros_like(reference)

    opacus_optimizer._generate_noise = zeros
    try:
        yield
    finally:
        opacus_optimizer._generate_noise = original


def audit_client_app(placement: Placement, image_size: int, batch_size: int,
                     photos_max: int, planted_bug: str | None = None) -> ClientApp:
    """fedface's ClientApp with ``placement``'s included canaries planted."""
    if planted_bug is not None and planted_bug not in PLANTED_BUGS:
        raise ValueError(f"planted_bug {planted_bug!r}: choose one of {PLANTED_BUGS}")

    def canaries(msg: Message, context: Context, call_next) -> Message:
        if is_real_device(context):
            raise RuntimeError("the audit's ClientApp plants canaries and runs on simulated "
                               "devices only")
        _, _, fleet = P.parse_round_config(msg.content[P.CONFIG])
        device = device_index(context)
        if device in placement.slots:
            data = load_device_data(fleet, device)
            if not any(i.startswith(CANARY_PREFIX) for i in data.train_ids):
                hold(fleet, device, with_canaries(data, placement, device, image_size,
                                                  batch_size, photos_max))
        if planted_bug == NOISE_OFF:
            with _no_dp_noise():
                return call_next(msg, context)
        return call_next(msg, context)

    app = ClientApp()
    app.train(mods=[canaries, simulated_faults, device_app._holding_state])(device_app.train)
    app.evaluate(mods=[device_app._holding_state])(device_app.evaluate)
    app.query()(device_app.roll_call)
    return app
