"""Budgets are hard limits, over many random schedules (hypothesis)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fl.privacy.ledger import PhotoLedger
from fl.privacy.user_level import UserMechanism

participation = st.tuples(st.floats(0.5, 3.0), st.sampled_from([0.05, 0.1, 0.25, 1 / 3, 0.5]),
                          st.integers(1, 30))


@settings(max_examples=25, deadline=None)
@given(schedule=st.lists(participation, min_size=1, max_size=6),
       budget=st.floats(0.5, 12.0), accountant=st.sampled_from(["rdp", "rdp", "prv"]))
def test_a_device_ledger_never_passes_its_budget(schedule, budget, accountant):
    """However often a device is sampled and with whatever mechanism, it trains
    only when the ledger admits it, so its epsilon never exceeds the budget."""
    ledger, delta = PhotoLedger(accountant=accountant), 1e-3
    for noise, rate, steps in schedule:
        if ledger.admits(noise, rate, steps, delta, budget):
            events = ledger.events + [(noise, rate, steps)]
            ledger.record(events, planned=(noise, rate, steps))
        assert ledger.epsilon(delta) <= budget + 1e-9


@settings(max_examples=15, deadline=None)
@given(noise=st.floats(0.3, 3.0), cohort=st.integers(1, 50), rounds=st.integers(1, 10),
       budget=st.floats(0.2, 10.0), sampling=st.sampled_from(["poisson", "fixed"]))
def test_the_fleet_never_releases_past_its_budget(noise, cohort, rounds, budget, sampling):
    """The server's rule: release round r only if epsilon(r) <= budget."""
    m = UserMechanism(noise, 0.1, sampling, 100, cohort, 1e-3)
    released = 0
    for _ in range(rounds):
        if m.epsilon(released + 1) > budget:
            break
        released += 1
    assert m.epsilon(released) <= budget
