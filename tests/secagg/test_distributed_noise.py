"""Distributed noise (``privacy.user.noise_at=devices``): each device adds its share
of the user-level Gaussian noise, std sigma C / sqrt(t), before masking.

* The released sum carries the survivors' noise: std sigma C sqrt(m / t) for m
  survivors (never below sigma C: a sum of fewer than t is abandoned), measured
  over thousands of coordinates against the known updates.
* The server cannot rebuild or remove it: a device replaying the same round state
  draws new noise (OS CSPRNG, not seeded), and a server that deviates and reads
  one device's masked vector (substituted keys, tests/secagg/test_limits.py) gets
  that update plus the device's noise share, never the clean update.
* The release adds no noise of its own, divides by the fixed k, and records the
  noise multiplier the survivors delivered; the accountant's sigma is at most that.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from experiments.bench.secagg_fleet import FakeFleet, reports, train_messages
from fl.config import ConfigError, compose, validate
from fl.privacy.plan import DEVICES, UserPlan, privacy_plan
from fl.privacy.release import DeviceUpdate, DpFedAvgRelease, SecureSum
from fl.privacy.user_level import UserMechanism
from fl.secagg import device as D
from fl.secagg import noise as device_noise
from fl.secagg import params as S
from fl.secagg.quantize import decode_sum, step
from fl.secagg.server import Abandoned
from fl.tracking import keys as K
from fl.tracking.privacy_report import report
from server.secure_aggregation import SecureAggregation
from server.transport import Transport
from tests.secagg.driver import play, substituted_keys_attack

SIGMA, CLIP, DIM = 1.0, 0.5, 6000
THRESHOLD = 0.75


def _params(cohort: int, sigma: float = SIGMA, dim: int = DIM) -> S.Params:
    s, t = S.share_counts(cohort, 1.0, THRESHOLD)
    return S.Params(round=1, cohort=cohort, num_shares=s, threshold=t, clip=CLIP,
                    target_range=S.target_range(cohort), keys=("w",), sizes=(dim,),
                    noise_multiplier=sigma)


def _updates(nodes, seed=0, scale=0.004):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=DIM) * scale for n in nodes}  # norm ~0.3 < C: not clipped


def _std_close(values: np.ndarray, expected: float, rel: float = 0.05) -> bool:
    """Sample std within ``rel`` of ``expected`` (6000 values: the estimate's own
    relative error is ~0.9%, so 5% is over five standard errors)."""
    return abs(float(np.std(values)) / expected - 1) < rel


# --- the noise in the sum ------------------------------------------------------------

@pytest.mark.parametrize("dropped", [0, 2])
def test_the_sum_carries_the_survivors_noise(dropped):
    """8 devices, t=6: all survive (noise sigma C sqrt(8/6)) or two drop before
    masking (6 survive: exactly sigma C). The sum minus the survivors' updates is
    centred noise of that std."""
    nodes = [3, 11, 2**63 + 7, 42, 17, 5, 8, 99]
    p = _params(len(nodes))
    assert p.threshold == 6
    updates = _updates(nodes)
    gone = nodes[:dropped]
    server, _, rejected = play(p, updates, drop={S.TRAIN: gone})
    total, count = server.unmasked_sum()
    assert count == len(nodes) - dropped and not rejected
    noise = total["w"] - sum(updates[n] for n in nodes if n not in gone)
    expected = SIGMA * CLIP * math.sqrt(count / p.threshold)
    assert _std_close(noise, expected)
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(DIM)


def test_fewer_survivors_than_the_threshold_are_never_released():
    """The threshold checks stop a round below t before unmasking; the sum's own
    check is the last guard (here reached by asking for it directly)."""
    nodes = [3, 11, 42, 17, 5]
    p = _params(len(nodes), dim=50)
    assert p.threshold == 4
    with pytest.raises(Abandoned):
        play(p, {n: np.zeros(50) for n in nodes}, drop={S.TRAIN: nodes[:2]})
    server, _, _ = play(p, {n: np.zeros(50) for n in nodes})
    server.masked = set(list(server.masked)[:3])
    with pytest.raises(Abandoned, match="whose noise makes up the accounted sigma"):
        server.unmasked_sum()


def test_device_noise_is_gaussian_from_the_os():
    """The CSPRNG draws: mean 0, std as asked, Gaussian tails (kurtosis 3), and two
    draws never repeat (nothing seeds them)."""
    a, b = device_noise.gaussian(200_000, 2.0), device_noise.gaussian(200_000, 2.0)
    assert abs(a.mean()) < 0.02 and _std_close(a, 2.0, rel=0.01)
    assert abs(float(np.mean(a**4) / np.mean(a**2) ** 2) - 3.0) < 0.1
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError):
        device_noise.gaussian(3, float("nan"))


def test_devices_refuse_a_bad_noise_multiplier():
    for sigma in (-1.0, float("inf")):
        with pytest.raises(D.Refused, match="noise multiplier"):
            D.setup(1, _params(5, sigma=sigma))


# --- what an adversarial server gets --------------------------------------------------

def test_a_replayed_round_draws_new_noise():
    """The server holds everything it was sent and replays the train stage on the
    same device state (same keys, seed and partners): the two masked vectors differ
    by two independent noise shares, so the noise cannot be rebuilt from what the
    server knows or chooses (it is not seeded by the run, the round or the node)."""
    nodes = [3, 11, 42, 17, 5]
    p = _params(len(nodes))
    updates = _updates(nodes, seed=4)
    _, sessions, _ = play(p, updates)
    session = sessions[3]
    replay = copy.deepcopy(session)
    replay.stage = session.stage = S.TRAIN
    first, second = D.mask(session, updates[3]), D.mask(replay, updates[3])
    levels = np.mod(first - second, p.mod_range)  # the masks cancel: same state
    levels[levels >= p.mod_range // 2] -= p.mod_range
    diff = levels * step(p.quantization_range, p.target_range)
    assert _std_close(diff, math.sqrt(2) * p.device_noise_std)


def test_a_deviating_server_reads_an_update_only_under_its_noise_share():
    """The key-substitution attack (no PKI; it recovers an update exactly without
    distributed noise, test_limits) now yields the update plus that device's own
    noise share, std sigma C / sqrt(t): the server never sees a noiseless update."""
    p = _params(5)
    update = _updates([10], seed=5)[10]
    recovered = decode_sum(substituted_keys_attack(p, update), 1, p.quantization_range,
                           p.target_range)
    assert _std_close(recovered - update, SIGMA * CLIP / math.sqrt(p.threshold))


# --- the release and the accountant --------------------------------------------------

NODES = [5, 2**63 + 1, 77, 9, 31]
SHARED = {"decoder.w": torch.zeros(60, 100), "encoder.w": torch.ones(3)}


@pytest.fixture()
def _server_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _release(noise_at=DEVICES, sigma=SIGMA):
    mechanism = UserMechanism(noise_multiplier=sigma, clip=CLIP, sampling="poisson",
                              population=100, cohort=5, delta=1e-3)
    plan = UserPlan(True, mechanism, fleet_population=100, fleet_cohort=5, noise_at=noise_at)
    return DpFedAvgRelease(plan, lambda k: k.startswith("decoder"), "seeded", seed=0)


@pytest.mark.parametrize("dropped", [0, 1])
@pytest.mark.usefixtures("_server_identity")
def test_the_release_records_the_noise_the_survivors_delivered(dropped):
    """5 devices, t=4, zero updates: the released change is the survivors' noise
    over k alone (the server adds none), std sigma C sqrt(m/t) / k; the metric says
    sigma sqrt(m/t); the accountant's epsilon is the one for sigma (at most what was
    delivered), as with the server's noise."""
    updates = {n: {"decoder.w": torch.zeros(60, 100)} for n in NODES}
    fleet = FakeFleet(updates, drop={S.TRAIN: NODES[:dropped]})
    release = _release()
    agg = SecureAggregation(Transport(fleet, ArrayRecord({}), 0.3, lambda *a: None), release,
                            num_shares=1.0, threshold=THRESHOLD, log=lambda line: None)
    replies = agg.collect(1, train_messages(SHARED, NODES), {n: n for n in NODES})
    released = agg.release(1, SHARED, reports(replies))
    m, t = len(NODES) - dropped, agg.round.params.threshold
    assert t == 4 and len(released.accepted) == m and release.released == 1
    delivered = SIGMA * math.sqrt(m / t)
    assert released.metrics[K.USER_NOISE_DELIVERED] == pytest.approx(delivered)
    assert release.mechanism.noise_multiplier <= delivered
    change = released.state["decoder.w"].double().numpy()
    assert _std_close(change, SIGMA * CLIP * math.sqrt(m / t) / 5)
    assert torch.equal(released.state["encoder.w"], SHARED["encoder.w"])


def test_the_accountant_counts_the_round_at_the_accounted_sigma():
    """Same accountant either way: after one release, the device-noise release
    reports the epsilon of sigma, as the server-noise release does."""
    devices, server = _release(), _release("server")
    summed = SecureSum({"decoder.w": torch.zeros(60, 100, dtype=torch.float64)}, 5, [1],
                       noise_multiplier=SIGMA * math.sqrt(5 / 4))
    a = devices.release_sum(1, SHARED, summed)
    b = server.release_sum(1, SHARED, summed)
    assert a.metrics[K.USER_EPS] == b.metrics[K.USER_EPS] > 0
    assert K.USER_NOISE_DELIVERED not in b.metrics


def test_a_sum_with_too_little_noise_is_not_released():
    release = _release()
    short = SecureSum({"decoder.w": torch.zeros(60, 100, dtype=torch.float64)}, 3, [1],
                      noise_multiplier=SIGMA * math.sqrt(3 / 4))
    with pytest.raises(ValueError, match="below the accounted"):
        release.release_sum(1, SHARED, short)
    assert release.released == 0
    with pytest.raises(ValueError, match="aggregation.secure"):
        release.release(1, SHARED, [DeviceUpdate(1, dict(SHARED))])
    assert release.released == 0


# --- config and report --------------------------------------------------------------

def test_noise_at_devices_needs_secure_aggregation_and_user_dp():
    cfg = compose(["privacy.user.noise_at=devices", "aggregation.secure=true"])
    validate(cfg)
    assert privacy_plan(cfg).user.noise_at == DEVICES
    for overrides, match in (
            (["privacy.user.noise_at=devices"], "aggregation.secure=true"),
            (["privacy.user.noise_at=clients"], "one of"),
            (["privacy.user.noise_at=devices", "aggregation.secure=true",
              "privacy.user.simulated_population=1000",
              "privacy.user.simulated_cohort_size=100"], "simulated")):
        with pytest.raises(ConfigError, match=match):
            validate(compose(overrides))
    assert compose([]).privacy.user.noise_at == "server"


def test_the_report_lists_one_trust_assumption_fewer():
    history = {1: {K.USER_EPS: 1.0, K.SECAGG_ABANDONED: 0.0}}
    server = report(privacy_plan(compose(["aggregation.secure=true"])), history)
    devices = report(privacy_plan(compose(["aggregation.secure=true",
                                           "privacy.user.noise_at=devices"])), history)
    assert len(devices["trust_assumptions"]) == len(server["trust_assumptions"]) - 1
    assert any("trusted to add the user-level noise" in t for t in server["trust_assumptions"])
    assert not any("trusted to add the user-level noise" in t
                   for t in devices["trust_assumptions"])
    assert any("add their share of the user-level noise" in t
               for t in devices["trust_assumptions"])
    assert devices["user_level"]["noise_added_by"] == DEVICES
