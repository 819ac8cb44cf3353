"""Secure aggregation in a real Flower simulation (slow): what the server holds.

One round on the tiny fleet, with user-level DP and seeded noise, twice: plain and
``aggregation.secure=true``. A grid wrapper records every reply the server pulls.

* Under SecAgg no reply carries weights: training replies carry a masked vector,
  and the masked vector of a device, decoded on its own, is nowhere near that
  device's update (read from the plain run, where the same seeded DP-SGD ran).
* The server never gets both kinds of share of one device.
* Only the sum decodes: the final shared weights equal the plain run's within the
  stated quantization error (``fl.secagg.quantize``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl import protocol as P
from fl.config import compose
from fl.secagg import params as S
from fl.secagg.quantize import decode_sum, device_clip, step
from server.checkpoint import load_checkpoint
from server.simulation import simulate

pytestmark = pytest.mark.slow


class Recording:
    """Passes everything through; keeps every message the server sends and pulls."""

    def __init__(self, grid) -> None:
        self.grid, self.sent, self.pulled = grid, [], []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += messages
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        self.pulled += replies
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def _run(tiny_overrides, tmp_path, name, extra):
    uri = f"sqlite:///{tmp_path / f'{name}.db'}"
    cfg = compose([*tiny_overrides, f"tracking.uri={uri}", "tracking.samples_every=0",
                   "fleet.rounds=1", "fleet.eval_devices=1", "fleet.newuser_identities=0",
                   f"checkpoint.dir={tmp_path / name}", *extra])
    recording = {}

    def wrap(grid):
        recording["grid"] = Recording(grid)
        return recording["grid"]

    summary = simulate(cfg, wrap_grid=wrap)
    last = load_checkpoint(tmp_path / name / summary.run_id / "last.pt")
    return cfg, summary, recording["grid"], last


def _trained(replies):
    return [r for r in replies if r.metadata.message_type == "train" and not r.has_error()]


def test_server_sees_only_the_sum(tiny_overrides, tmp_path):
    cfg, plain, plain_grid, plain_last = _run(tiny_overrides, tmp_path, "plain", [])
    _, secure, grid, last = _run(tiny_overrides, tmp_path, "secure",
                                 ["aggregation.secure=true"])
    assert secure.final("fleet/devices_trained") == plain.final("fleet/devices_trained") == 3
    assert secure.final("fleet/secagg_abandoned") == 0

    # Each device's update in the clear, from the plain run (same seeded DP-SGD).
    sent = {m.metadata.dst_node_id: m for m in plain_grid.sent
            if m.metadata.message_type == "train"}
    shared0 = next(iter(sent.values())).content[P.ARRAYS].to_torch_state_dict()
    setup = next(m for m in grid.sent if m.metadata.message_type == S.MESSAGE_TYPE[S.SETUP])
    params = S.Params.from_record(setup.content[S.RECORD])
    updates = []
    for reply in _trained(plain_grid.pulled):
        arrays = reply.content[P.ARRAYS].to_torch_state_dict()
        updates.append(np.concatenate([(arrays[k].double() - shared0[k].double())
                                       .reshape(-1).numpy() for k in params.keys]))

    # Nothing in the clear under SecAgg: no weights, a masked vector per device,
    # which decoded alone is noise (not the device's update, nor any other's).
    train_replies = _trained(grid.pulled)
    assert len(train_replies) == 3
    for reply in grid.pulled:
        assert P.ARRAYS not in reply.content
    for reply in train_replies:
        vector = reply.content[S.MASKED][S.MASKED].numpy()
        alone = decode_sum(vector, 1, params.clip, params.target_range)
        for update in updates:
            assert np.linalg.norm(alone - update) > 100 * params.clip
            assert abs(np.corrcoef(alone, update)[0, 1]) < 0.2

    # Never both secrets of one device: per owner, shares of one kind (one length).
    kinds: dict[int, set[int]] = {}
    for reply in grid.pulled:
        if reply.metadata.message_type == S.MESSAGE_TYPE[S.UNMASK]:
            record = reply.content[S.RECORD]
            for owner, share in zip(record[S.OWNERS], record[S.SHARES], strict=True):
                kinds.setdefault(owner, set()).add(len(share))
    assert kinds and all(len(lengths) == 1 for lengths in kinds.values())

    # Only the sum decodes, and equals the plain run's within the quantization error:
    # per coordinate, n rounding steps plus the clip's shrink, over the divisor k.
    n, k = 3, cfg.fleet.devices_per_round
    d = params.dimension
    q = step(params.clip, params.target_range)
    bound = n * (q + (params.clip - device_clip(params.clip, params.target_range, d))) / k
    for key in params.keys:
        got, want = last.loop.shared[key].double(), plain_last.loop.shared[key].double()
        assert not torch.equal(got, shared0[key].double())
        assert torch.allclose(got, want, rtol=0, atol=bound + 1e-6), \
            float((got - want).abs().max())
    assert math.isclose(secure.final("privacy/user_eps"), plain.final("privacy/user_eps"))
