"""The release contract: every way of publishing a round passes the same tests
(the shape of dp-accounting's ``privacy_accountant_test``), plus what only
DP-FedAvg promises. A device's reply is untrusted: each test plays the device."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.serverapp.strategy import FedAvg

from fl import protocol as P
from fl.privacy.plan import UserPlan
from fl.privacy.release import DeviceUpdate, DpFedAvgRelease, PlainRelease, screen_update
from fl.privacy.user_level import UserMechanism
from fl.tracking import keys as K
from tests.privacy.replies import train_reply

SHARED = {"decoder.w": torch.zeros(64), "encoder.w": torch.zeros(8)}


def _mechanism(**kw) -> UserMechanism:
    base = {"noise_multiplier": 1.0, "clip": 1.0, "sampling": "poisson", "population": 100,
            "cohort": 4, "delta": 1e-3}
    return UserMechanism(**{**base, **kw})


def dp_release(noise: str = "seeded", budget: float = 0.0, **kw) -> DpFedAvgRelease:
    plan = UserPlan(True, _mechanism(**kw), budget_epsilon=budget, fleet_population=100,
                    fleet_cohort=4)
    return DpFedAvgRelease(plan, lambda k: k.startswith("decoder"), noise_mode=noise, seed=0)


def plain_release() -> PlainRelease:
    return PlainRelease(FedAvg(weighted_by_key=P.WEIGHT_KEY))


RELEASES = {"plain": plain_release, "dp_fedavg": dp_release}


def _update(node: int, value: float, weight: float = 5, **overrides) -> DeviceUpdate:
    arrays = {k: torch.full_like(v, value) for k, v in SHARED.items()} | overrides
    return DeviceUpdate(node, arrays, weight, train_reply(node, arrays))


@pytest.fixture(params=sorted(RELEASES))
def kind(request) -> str:
    return request.param


@pytest.fixture()
def release(kind):
    return RELEASES[kind]()


def test_a_nan_update_is_rejected_and_the_release_stays_finite(release):
    nan = _update(1, 0.0, **{"decoder.w": torch.full((64,), float("nan"))})
    out = release.release(1, SHARED, [_update(0, 0.1), nan])
    assert out.accepted == [0] and "non-finite" in out.rejected[1]
    assert all(bool(torch.isfinite(v).all()) for v in out.state.values())


def test_an_infinite_update_cannot_pass_the_clip(release):
    inf = _update(1, 0.0, **{"decoder.w": torch.full((64,), float("inf"))})
    out = release.release(1, SHARED, [inf])
    assert 1 in out.rejected
    assert all(bool(torch.isfinite(v).all()) for v in out.state.values())


@pytest.mark.parametrize("arrays,reason", [
    ({"decoder.w": torch.zeros(63), "encoder.w": torch.zeros(8)}, "expected"),
    ({"decoder.w": torch.zeros(64, dtype=torch.float64), "encoder.w": torch.zeros(8)},
     "expected"),
    ({"decoder.w": torch.zeros(64)}, "missing arrays"),
    ({**SHARED, "personal.identity": torch.zeros(4)}, "unexpected arrays"),
])
def test_a_malformed_update_is_rejected_with_its_reason(release, arrays, reason):
    out = release.release(1, SHARED, [DeviceUpdate(3, arrays, 5, train_reply(3, arrays))])
    assert reason in out.rejected[3] and out.accepted == []


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0, 0.0])
def test_an_impossible_example_count_is_rejected(release, weight):
    out = release.release(1, SHARED, [_update(0, 0.1), _update(1, 0.2, weight=weight)])
    assert "example count" in out.rejected[1] and out.accepted == [0]
    assert all(bool(torch.isfinite(v).all()) for v in out.state.values())


def test_the_strategy_sees_only_the_screened_arrays_and_weight(release):
    """Extra records and metrics in a reply used to crash Flower's FedAvg
    (InconsistentMessageReplies) or slip past the screen."""
    hostile = _update(1, 0.2)
    hostile.message.content["extra"] = type(hostile.message.content[P.METRICS])({"x": 1.0})
    hostile.message.content[P.METRICS]["bogus"] = float("nan")
    out = release.release(1, SHARED, [_update(0, 0.1), hostile])
    assert out.accepted == [0, 1]
    assert all(bool(torch.isfinite(v).all()) for v in out.state.values())


def test_releasing_counts_once_per_round_and_never_mutates_the_input(release):
    before = {k: v.clone() for k, v in SHARED.items()}
    for rnd in (1, 2, 3):
        release.release(rnd, SHARED, [_update(0, 0.5)])
    assert release.released == 3
    assert all(torch.equal(SHARED[k], before[k]) for k in SHARED)


def test_the_count_survives_a_checkpoint(kind, release):
    release.release(1, SHARED, [])
    again = RELEASES[kind]()
    again.load_state_dict(release.state_dict())
    assert again.released == 1 and again.metrics() == release.metrics()


def test_screen_accepts_exactly_the_weights_it_sent():
    assert screen_update(dict(SHARED), SHARED) == ""


# --- DP-FedAvg only -------------------------------------------------------------------

def test_dp_fedavg_clips_noises_and_accounts_every_round_even_an_empty_one():
    release = dp_release(noise_multiplier=2.0)
    out = release.release(1, SHARED, [])
    assert out.state["decoder.w"].abs().sum() > 0  # noise with nobody answering
    assert torch.equal(out.state["encoder.w"], SHARED["encoder.w"])  # not device-trained
    assert out.metrics[K.USER_EPS] == pytest.approx(release.mechanism.epsilon(1))


def test_dp_fedavg_stops_before_passing_its_budget():
    release = dp_release()
    release.budget = (release.mechanism.epsilon(2) + release.mechanism.epsilon(3)) / 2
    for rnd in (1, 2):
        assert release.stop_reason() == ""
        release.release(rnd, SHARED, [])
    assert "past the budget" in release.stop_reason()


def test_a_simulated_budget_says_it_limits_the_simulated_epsilon():
    release = dp_release(population=10_000, cohort=100, simulated=True)
    release.budget = release.mechanism.epsilon(1) / 2
    assert "simulated user-level epsilon" in release.stop_reason()


@pytest.mark.parametrize("noise", ["seeded", "secure"])
def test_the_noise_on_the_sum_has_the_accounted_scale(noise):
    shared = {"decoder.w": torch.zeros(100_000)}
    plan = UserPlan(True, _mechanism(noise_multiplier=2.0, clip=0.5), fleet_population=100,
                    fleet_cohort=4)
    release = DpFedAvgRelease(plan, lambda k: True, noise, seed=0)
    out = release.release(1, shared, [])
    assert (out.state["decoder.w"].double() * 4).std().item() == pytest.approx(1.0, rel=0.02)
    assert math.isfinite(out.metrics[K.USER_EPS])


# --- bounded aggregation without DP (a hostile device in a plain FedAvg) -----------------

def test_without_bounds_a_device_claiming_a_billion_examples_replaces_the_model():
    out = plain_release().release(1, SHARED, [_update(0, 0.1), _update(1, 50.0, weight=1e9)])
    assert out.state["decoder.w"][0].item() == pytest.approx(50.0, rel=1e-6)


def test_a_norm_bound_and_an_example_cap_bound_one_devices_pull():
    release = PlainRelease(FedAvg(weighted_by_key=P.WEIGHT_KEY), norm_bound=1.0,
                           max_examples=1)
    honest = [_update(n, 0.01) for n in range(9)]
    out = release.release(1, SHARED, [*honest, _update(9, 50.0, weight=1e9)])
    delta = torch.cat([out.state[k] - SHARED[k] for k in SHARED])
    # nine honest updates of norm 0.01*sqrt(72) = 0.085 and one scaled to norm 1,
    # equal weights: the mean moves by at most (9 * 0.085 + 1) / 10
    assert delta.norm().item() <= (9 * 0.01 * 72 ** 0.5 + 1.0) / 10 + 1e-6


@pytest.mark.parametrize("target", ["FedMedian", "FedTrimmedAvg"])
def test_flowers_robust_strategies_shrug_off_one_hostile_device(target):
    import flwr.serverapp.strategy as strategies

    release = PlainRelease(getattr(strategies, target)(weighted_by_key=P.WEIGHT_KEY))
    honest = [_update(n, 0.01 * (n + 1)) for n in range(9)]
    out = release.release(1, SHARED, [*honest, _update(9, 50.0, weight=1e9)])
    assert out.state["decoder.w"].abs().max().item() < 0.1
