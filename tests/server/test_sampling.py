"""Device sampling matches the accounting, even when most devices are gone.

The user-level accountant is told each user is in a round with rate k/N
(``SampledWithoutReplacement(N, k)`` or Poisson q = k/N). fedface used to draw
k from the *eligible* devices, so with half the fleet gone every remaining user
was sampled twice as often as accounted, and the reported epsilon was about
half the true one.
"""

from __future__ import annotations

import numpy as np
import pytest

from fl.privacy.user_level import UserMechanism
from server.sampling import CohortSampler

N, K, ROUNDS = 100, 10, 4000


@pytest.mark.parametrize("scheme", ["fixed", "poisson"])
def test_with_half_the_fleet_gone_each_user_is_sampled_at_the_accounted_rate(scheme):
    fleet = list(range(1000, 1000 + N))  # node ids, in device order
    eligible = fleet[::2]  # 50 devices spent their budget, deleted or were excluded
    sampler = CohortSampler(scheme, K, N, seed=3)
    counts = np.zeros(N)
    for _ in range(ROUNDS):
        cohort = sampler.cohort(fleet, eligible)
        assert set(cohort) <= set(eligible) and len(cohort) == len(set(cohort))
        for node in cohort:
            counts[node - 1000] += 1
    rates = counts[::2] / ROUNDS
    # binomial(4000, 0.1): std of one rate 0.0047; of the mean over 50, 0.0007
    assert rates.mean() == pytest.approx(K / N, abs=0.004)
    assert rates.max() < K / N + 0.025
    assert counts[1::2].sum() == 0


def test_fixed_sampling_draws_exactly_k_when_everyone_is_eligible():
    fleet = list(range(N))
    sampler = CohortSampler("fixed", K, N, seed=0)
    assert all(len(sampler.cohort(fleet, fleet)) == K for _ in range(50))


def test_the_sampler_refuses_a_fleet_of_another_size_than_accounted():
    with pytest.raises(ValueError, match="accountant assumes 100"):
        CohortSampler("fixed", K, N, seed=0).cohort(list(range(50)), list(range(50)))


def test_what_drawing_from_the_eligible_only_would_have_cost():
    """The issue's numbers: 20 rounds at sigma 1 with 50 of 100 devices left,
    accounted as drawn from 100 (what fedface reports, and now does) against
    drawn from 50 (what the old sampler did)."""
    def eps(population: int) -> float:
        return UserMechanism(1.0, 0.05, "fixed", population, K, 1e-3).epsilon(20)

    assert eps(N) == pytest.approx(20.3, abs=0.1)
    assert eps(50) == pytest.approx(39.1, abs=0.1)


def test_the_sampling_state_round_trips():
    fleet = list(range(N))
    a = CohortSampler("poisson", K, N, seed=1)
    a.cohort(fleet, fleet)
    b = CohortSampler("poisson", K, N, seed=99)
    b.restore(a.state())
    assert a.cohort(fleet, fleet) == b.cohort(fleet, fleet)


@pytest.mark.parametrize("scheme", ["fixed", "poisson"])
def test_cohorts_are_the_same_draws_by_device_index_whatever_is_eligible(scheme):
    """Seeded runs stay reproducible by device index: the same seed gives the same
    cohorts as the element-by-element Poisson draw fedface always made, and who
    is eligible (the loop's lazy ``Eligible``, or a plain set) only filters them."""
    from server.records import DeviceRecords, Eligible

    records = DeviceRecords()
    records[4].deleted = True  # a device that deleted its data
    records[7].unavailable_until = 99  # a paused one
    present = {d: 1000 + d for d in range(N) if d != 9}  # device 9 is not connected
    eligible = Eligible(present, records, exhausted={11}, rnd=1)
    blocked = {4, 7, 9, 11}
    assert eligible.any() and all((d in eligible) == (d not in blocked) for d in range(N))
    assert len(records) == 2  # asking about a device makes no record

    old = np.random.default_rng(5)
    a, b = CohortSampler(scheme, K, N, seed=5), CohortSampler(scheme, K, N, seed=5)
    for _ in range(20):
        drawn = b.cohort(range(N), set(range(N)))
        assert a.cohort(range(N), eligible) == [d for d in drawn if d not in blocked]
        if scheme == "poisson":
            assert drawn == [d for d, u in zip(range(N), old.random(N)) if u < K / N]


def test_no_device_can_train_when_every_present_one_is_blocked():
    from server.records import DeviceRecords, Eligible

    records = DeviceRecords()
    records[0].excluded = True
    assert not Eligible({0: 10, 1: 11}, records, exhausted={1}, rnd=1).any()
    assert Eligible({0: 10, 1: 11, 2: 12}, records, exhausted={1}, rnd=1).any()
