"""``server.secure_aggregation`` over Flower messages (in process, no Ray): the
device handlers of ``clients.secagg``, real ``Message``/``Context`` objects, the
release. Devices drop, crash or misbehave at each stage; the round either
releases the survivors' sum or is abandoned cleanly (nothing released, nothing
counted as released, the failure logged and counted)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from experiments.bench.secagg_fleet import FakeFleet, reports, train_messages
from fl import protocol as P
from fl.privacy.plan import UserPlan
from fl.privacy.release import DeviceUpdate, DpFedAvgRelease, PlainRelease
from fl.privacy.user_level import UserMechanism
from fl.secagg import params as S
from fl.secagg.quantize import device_clip, step
from fl.tracking import keys as K
from server.secure_aggregation import SecureAggregation
from server.transport import Transport

NODES = [5, 2**63 + 1, 77, 9, 31]
SHARED = {"decoder.w": torch.zeros(6, 4), "decoder.b": torch.zeros(4),
          "encoder.w": torch.ones(3)}


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """A ServerApp's messages need the run it belongs to (Flower sets this)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _updates(seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {n: {"decoder.w": torch.randn(6, 4, generator=g) * scale,
                "decoder.b": torch.randn(4, generator=g) * scale} for n in NODES}


def _dp_release(clip=1.0):
    mechanism = UserMechanism(noise_multiplier=1.0, clip=clip, sampling="poisson",
                              population=100, cohort=5, delta=1e-3)
    plan = UserPlan(True, mechanism, fleet_population=100, fleet_cohort=5)
    return DpFedAvgRelease(plan, lambda k: k.startswith("decoder"), "seeded", seed=0)


def _round(fleet, release, timeout=0.3):
    logged = []
    agg = SecureAggregation(Transport(fleet, ArrayRecord({}), timeout, lambda *a: None),
                            release, num_shares=1.0, threshold=0.5, log=logged.append)
    replies = agg.collect(1, train_messages(SHARED, NODES), {n: n for n in NODES})
    return agg.release(1, SHARED, reports(replies)), logged, agg


def test_secure_dp_fedavg_equals_plain_within_the_quantization_error():
    """Seeded noise: the same release from the unmasked sum as from the updates."""
    updates = _updates()
    updates[77] = {k: v * 50 for k, v in updates[77].items()}  # clipped on its device
    plain = _dp_release().release(1, SHARED, [
        DeviceUpdate(n, {k: SHARED[k] + u.get(k, 0) for k in SHARED}) for n, u in
        updates.items()])
    secure, logged, _ = _round(FakeFleet(updates), _dp_release())
    assert not logged and not secure.rejected and sorted(secure.accepted) == sorted(NODES)
    d, c = 28, 1.0
    t = S.target_range(5)
    bound = 5 * (step(c, t) + (c - device_clip(c, t, d))) / 5 + 1e-6
    for key in ("decoder.w", "decoder.b"):
        assert torch.allclose(secure.state[key], plain.state[key], rtol=0, atol=bound)
        assert not torch.equal(secure.state[key], SHARED[key])
    assert torch.equal(secure.state["encoder.w"], SHARED["encoder.w"])
    assert secure.metrics[K.USER_EPS] == plain.metrics[K.USER_EPS]
    assert secure.metrics[K.SECAGG_ABANDONED] == 0


@pytest.mark.parametrize("stage", S.STAGES)
@pytest.mark.parametrize("how", ["drop", "crash"])
def test_a_device_lost_at_any_stage_is_recovered(stage, how):
    """One of five devices times out (never answers) or errs at each stage; the
    others' mean is released (devices lost before training are not in it)."""
    updates = _updates(seed=1)
    fleet = FakeFleet(updates, **{how: {stage: [77]}})
    released, logged, _ = _round(fleet, PlainRelease(None, norm_bound=10.0))
    survivors = [n for n in NODES if n != 77 or stage == S.UNMASK]
    assert sorted(released.accepted) == sorted(survivors) and not logged
    mean = sum(updates[n]["decoder.w"] for n in survivors) / len(survivors)
    assert torch.allclose(released.state["decoder.w"], mean, atol=1e-5)


@pytest.mark.parametrize("stage", S.STAGES)
def test_below_the_threshold_nothing_is_released(stage):
    """Three of five time out at a stage (threshold 3): the round is abandoned,
    logged and counted; the weights are those sent; no release is counted."""
    release = _dp_release()
    fleet = FakeFleet(_updates(), drop={stage: NODES[:3]})
    released, logged, _agg = _round(fleet, release)
    assert released.accepted == [] and release.released == 0
    for key, value in SHARED.items():
        assert torch.equal(released.state[key], value)
    assert released.metrics[K.SECAGG_ABANDONED] == 1
    assert len(logged) == 1 and "abandoned, nothing released" in logged[0]
    # Devices left waiting when it was abandoned before training are excused, not failed.
    assert sorted(released.excused) == (sorted(NODES[3:]) if stage in (
        S.SETUP, S.SHARE_KEYS) else [])
    assert math.isclose(released.metrics[K.USER_EPS], 0.0, abs_tol=1e-12)


def _tampered_record(stage_reply: str, edit):
    def tamper(node, reply):
        if node == 9 and not reply.has_error():
            record = dict(reply.content[S.RECORD].items())
            reply.content[S.RECORD] = ConfigRecord(edit(record))
        return reply
    return {stage_reply: tamper}


@pytest.mark.parametrize("stage,edit,reason", [
    (S.SETUP, lambda r: r | {S.STAGE: S.UNMASK}, "stage 'unmask' where 'setup'"),
    (S.SHARE_KEYS, lambda r: r | {S.CIPHERTEXTS: r[S.CIPHERTEXTS][:1]},
     "expected one for each"),
    (S.SHARE_KEYS, lambda r: r | {S.CIPHERTEXTS: [b"x" * 10] * len(r[S.CIPHERTEXTS])},
     "implausible size"),
    (S.UNMASK, lambda r: r | {S.OWNERS: list(reversed(r[S.OWNERS]))}, "expected one"),
])
def test_hostile_protocol_replies_are_rejected_like_any_bad_reply(stage, edit, reason):
    fleet = FakeFleet(_updates(seed=2), tamper=_tampered_record(stage, edit))
    released, logged, _ = _round(fleet, PlainRelease(None, norm_bound=10.0))
    assert reason in released.rejected[9] and not logged
    assert released.accepted and 9 not in released.accepted or stage == S.UNMASK


def test_a_masked_vector_that_is_not_one_is_rejected():
    def tamper(node, reply):
        if node == 9 and S.MASKED in reply.content:
            reply.content[S.MASKED] = ArrayRecord({"other": torch.zeros(3)})
        return reply
    fleet = FakeFleet(_updates(seed=3), tamper={S.TRAIN: tamper})
    released, _, _ = _round(fleet, PlainRelease(None, norm_bound=10.0))
    assert "masked vector cannot be decoded" in released.rejected[9]
    assert sorted(released.accepted) == sorted(n for n in NODES if n != 9)


def test_a_device_that_refuses_the_parameters_says_why():
    """Setup parameters with a minority threshold: every honest device refuses."""
    fleet = FakeFleet(_updates())
    agg = SecureAggregation(Transport(fleet, ArrayRecord({}), 0.3, lambda *a: None),
                            PlainRelease(None, norm_bound=1.0), 1.0, 0.5)
    agg.devices, agg.rejected = {n: n for n in NODES}, {}
    p = S.Params(round=1, cohort=5, num_shares=5, threshold=2, clip=1.0,
                 target_range=S.target_range(5), keys=("decoder.b",), sizes=(4,))
    from fl.secagg.server import Round
    r = Round(p, NODES)
    agg._stage(1, S.SETUP, NODES, lambda n: r.setup_request(), r.accept_keys)
    assert all("refused (setup parameters refused: threshold 2 is not a majority"
               in why for why in agg.rejected.values()) and len(agg.rejected) == 5


def test_a_device_sending_bad_unmasking_shares_is_rejected_named_and_the_round_released():
    """Device 9 returns garbage of the right length for every share at unmask: the
    others rebuild each secret, its shares disagree with it, and it is rejected like
    a malformed reply and named in the log; the round's sum is still released."""
    garbage = _tampered_record(S.UNMASK, lambda r: r | {
        S.SHARES: [s[:4] + bytes(len(s) - 4) for s in r[S.SHARES]]})
    updates = _updates(seed=4)
    released, logged, _ = _round(FakeFleet(updates, tamper=garbage),
                                 PlainRelease(None, norm_bound=10.0))
    assert "malformed reply (unmask: its share of node" in released.rejected[9]
    assert len(logged) == 1 and "device 9 sent bad unmasking shares" in logged[0]
    assert released.metrics[K.SECAGG_ABANDONED] == 0
    mean = sum(u["decoder.w"] for u in updates.values()) / len(updates)
    assert torch.allclose(released.state["decoder.w"], mean, atol=1e-5)


def test_a_masked_update_counts_its_loss_and_photos():
    """The loop's train/loss and consent/photos_used come from the reports of the
    updates that counted; under secure aggregation an update comes masked, not as
    arrays (the default experiment logged train/loss nan with the flag before)."""
    import numpy as np
    from flwr.app import Array

    from server.records import fold_train_reports
    from tests.server.test_records import _parse, _records, _reply

    replies = [_reply(1), _reply(2, **{P.TRAIN_LOSS: 0.3})]
    for reply in replies:
        del reply.content[P.ARRAYS]
        reply.content[S.MASKED] = ArrayRecord({S.MASKED: Array(np.zeros(2, dtype=np.int64))})
    records = _records(1, 2)
    reports, failed, rejected = _parse(replies, [1, 2], records)
    assert not failed and not rejected
    losses, photos = fold_train_reports(records, reports, {}, set())
    assert losses == [0.1, 0.3] and photos == 24
