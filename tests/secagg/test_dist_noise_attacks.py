"""Adversarial review of distributed noise (``privacy.user.noise_at=devices``):
what an honest-but-curious server, or anyone holding the released model, could
get below the accounted sigma. Each test fails on a broken mechanism:

* a device that masked but dropped before unmasking stays in the sum with its
  noise, and is counted as a survivor (its update and noise are recovered
  together; counting it out would understate, counting only it in would lie);
* the server's delivered multiplier comes from the same threshold it enforces,
  also when fewer devices than ``fleet.devices_per_round`` are sampled;
* truncation happens at (nearly) 10 std and every sent coordinate stays in 0..T
  even for the worst-case clipped update, so no wrap can cancel noise;
* the noise share is not reproducible from any seed a run sets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from experiments.bench.secagg_fleet import FakeFleet, reports, train_messages
from fl.secagg import noise as device_noise
from fl.secagg import params as S
from fl.secagg.quantize import clip_and_quantize, quantize_noise, step
from server.secure_aggregation import SecureAggregation
from server.transport import Transport
from tests.secagg.driver import play
from tests.secagg.test_distributed_noise import (
    _params,
    _release,
    _std_close,
    _updates,
)

SIGMA, CLIP = 1.0, 0.5


def test_devices_that_masked_then_dropped_keep_their_noise_in_the_sum():
    """8 devices (t=6), two vanish after sending their masked update, before
    unmasking: their self masks are rebuilt from shares, so their update and their
    noise are both in the sum, and they count among the m survivors."""
    nodes = [3, 11, 2**63 + 7, 42, 17, 5, 8, 99]
    p = _params(len(nodes))
    updates = _updates(nodes, seed=1)
    server, _, rejected = play(p, updates, drop={S.UNMASK: nodes[:2]})
    total, count = server.unmasked_sum()
    assert count == len(nodes) and not rejected
    noise = total["w"] - sum(updates.values())
    assert _std_close(noise, SIGMA * CLIP * math.sqrt(count / p.threshold))


@pytest.mark.usefixtures("_server_identity")
@pytest.mark.parametrize("late", [0, 1])
def test_a_short_cohort_is_noised_and_accounted_with_the_threshold_enforced(late):
    """fleet.devices_per_round is 5 (the release's k), but only 4 devices are
    sampled: t comes from the 4 (t=3), each device's share is sigma C / sqrt(3),
    the server enforces that same t, and the delivered multiplier it logs is
    sigma sqrt(m/3) >= sigma. ``late``: one device drops after masking."""
    nodes = [7, 8, 9, 10]
    updates = {n: {"decoder.w": torch.zeros(60, 100)} for n in nodes}
    fleet = FakeFleet(updates, drop={S.UNMASK: nodes[:late]})
    release = _release()
    agg = SecureAggregation(Transport(fleet, ArrayRecord({}), 0.3, lambda *a: None), release,
                            num_shares=1.0, threshold=0.75, log=lambda line: None)
    shared = {"encoder.w": torch.ones(3), "decoder.w": torch.zeros(60, 100)}
    replies = agg.collect(1, train_messages(shared, nodes), {n: n for n in nodes})
    p = agg.round.params
    assert p.cohort == 4 and p.threshold == 3
    assert p.device_noise_std == pytest.approx(SIGMA * CLIP / math.sqrt(3))
    released = agg.release(1, shared, reports(replies))
    assert len(released.accepted) == 4 and release.released == 1
    delivered = released.metrics["privacy/user_noise_delivered"]
    assert delivered == pytest.approx(SIGMA * math.sqrt(4 / 3))
    change = released.state["decoder.w"].double().numpy() * release.k
    assert _std_close(change, SIGMA * CLIP * math.sqrt(4 / 3))


@pytest.fixture()
def _server_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


@pytest.mark.parametrize("cohort", [3, 10, 100])
def test_truncation_is_at_ten_std_and_no_coordinate_leaves_the_field(cohort):
    """The worst case: all of the clipped update on one coordinate, the noise
    pushed far beyond the tail on every coordinate, both signs. The truncation
    point is 10 std less two levels (what the docs claim), and every coordinate
    sent is in 0..T, so n of them never wrap mod M (a wrap would let a sum
    decode to a value whose noise the server could cancel)."""
    p = _params(cohort, dim=50)
    std, r = p.device_noise_std, p.quantization_range
    limit = r - p.clip - 2 * step(r, p.target_range)
    assert 9.999 * std < limit < 10 * std
    for sign in (1.0, -1.0):
        update = np.zeros(50)
        update[0] = sign * 10 * p.clip  # clipped to just under C
        q = clip_and_quantize(update, p.clip, p.target_range, r)
        noise = quantize_noise(np.full(50, sign * 1e6 * std), p.clip, p.target_range, r)
        sent = q + noise
        assert sent.min() >= 0 and sent.max() <= p.target_range
        assert np.abs(noise).max() <= math.ceil(limit / step(r, p.target_range))


def test_the_noise_share_ignores_every_seed_a_run_sets():
    """Seeding numpy's and torch's global generators identically (what a
    reproducible run does) gives different noise: the server cannot rebuild a
    device's share from privacy.seed."""
    np.random.seed(0)
    torch.manual_seed(0)
    a = device_noise.gaussian(1000, 1.0)
    np.random.seed(0)
    torch.manual_seed(0)
    b = device_noise.gaussian(1000, 1.0)
    assert not np.allclose(a, b)
    assert np.corrcoef(a, b)[0, 1] < 0.2


@pytest.mark.usefixtures("_server_identity")
@pytest.mark.parametrize("noise_at", ["devices", "server"])
def test_a_noised_sum_decoded_then_abandoned_is_still_accounted(noise_at):
    """A hostile device adds half the field to its masked vector: the server
    decodes the sum, finds it out of range and abandons the round. Under device
    noise it has seen one output of the mechanism (the sum plus the survivors'
    noise), so the accountant must compose it: before the fix the ledger's
    epsilon stayed at zero rounds while the server held a noised sum. Under the
    server's noise nothing was noised, nothing is counted (its trust assumption)."""
    from flwr.app import Array

    nodes = [7, 8, 9, 10, 11]

    def hostile(node, reply):
        if node == 9 and S.MASKED in reply.content:
            vector = reply.content[S.MASKED][S.MASKED].numpy()
            shifted = np.mod(vector + S.MOD_RANGE // 2, S.MOD_RANGE).astype(vector.dtype)
            reply.content[S.MASKED] = ArrayRecord({S.MASKED: Array(shifted)})
        return reply

    updates = {n: {"decoder.w": torch.zeros(60, 100)} for n in nodes}
    fleet = FakeFleet(updates, tamper={S.TRAIN: hostile})
    release, logged = _release(noise_at), []
    agg = SecureAggregation(Transport(fleet, ArrayRecord({}), 0.3, lambda *a: None), release,
                            num_shares=1.0, threshold=0.75, log=logged.append)
    shared = {"encoder.w": torch.ones(3), "decoder.w": torch.zeros(60, 100)}
    replies = agg.collect(1, train_messages(shared, nodes), {n: n for n in nodes})
    released = agg.release(1, shared, reports(replies))
    assert not released.accepted and agg.round.unmasked
    assert torch.equal(released.state["decoder.w"], shared["decoder.w"])
    assert any("outside what honest devices" in line for line in logged)
    if noise_at == "devices":
        assert release.released == 1
        assert released.metrics["privacy/user_eps"] > 0
    else:
        assert release.released == 0


def test_the_report_says_the_server_still_tells_devices_sigma():
    """Devices take sigma and t from the server's setup message (they only check
    sigma >= 0): the report must not claim the noise needs no trust in the server."""
    from fl.config import compose
    from fl.privacy.plan import privacy_plan
    from fl.tracking.privacy_report import report

    plan = privacy_plan(compose(["aggregation.secure=true", "privacy.user.noise_at=devices"]))
    trust = report(plan, {1: {"fleet/secagg_abandoned": 0.0}})["trust_assumptions"]
    assert any("tell the devices the accounted sigma and threshold" in t for t in trust)
