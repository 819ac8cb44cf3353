"""User-level (fleet) accounting and calibration against independent references."""

import pytest

from fl.privacy.ledger import epsilon_of
from fl.privacy.user_level import UserMechanism, calibrate


def _mech(**kw):
    base = {"noise_multiplier": 1.0, "clip": 0.1, "sampling": "poisson", "population": 1000,
                "cohort": 20, "delta": 1e-4, "accountant": "rdp"}
    return UserMechanism(**{**base, **kw})


@pytest.mark.parametrize("accountant,opacus", [("rdp", "rdp"), ("pld", "prv")])
def test_poisson_fleet_epsilon_matches_opacus(accountant, opacus):
    """dp-accounting (ours) vs Opacus' independent implementations: same mechanism,
    a Poisson-subsampled Gaussian per round."""
    m = _mech(accountant=accountant)
    ours = m.epsilon(50)
    reference = epsilon_of([(1.0, m.sample_rate, 50)], 1e-4, opacus)
    assert ours == pytest.approx(reference, rel=0.02)


def test_fixed_size_sampling_uses_replace_one_and_costs_more_than_poisson():
    poisson, fixed = _mech(), _mech(sampling="fixed")
    assert fixed.relation == "replace one user" and poisson.relation == "add/remove one user"
    # replacing a user moves the clipped sum by up to 2C, adding/removing by C
    assert poisson.epsilon(30) < fixed.epsilon(30)


def test_fixed_size_without_amplification_is_the_plain_gaussian():
    """Sampling everyone (k = N) amplifies nothing: replace-one Gaussian with
    sensitivity 2C, i.e. a Gaussian with noise multiplier sigma/2."""
    import dp_accounting as dpa

    m = _mech(sampling="fixed", population=10, cohort=10, noise_multiplier=2.0)
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.GaussianDpEvent(1.0), 5)
    assert m.epsilon(5) == pytest.approx(acc.get_epsilon(1e-4), rel=1e-6)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_epsilon_from_the_kept_one_round_curve_is_a_fresh_accountants(sampling):
    """The server keeps one round's RDP curve and scales it (so epsilon(r) costs no
    new RDP evaluation each round): it must be exactly what a fresh dp-accounting
    accountant composing r rounds reports."""
    for noise in (0.7, 1.3):
        m = _mech(sampling=sampling, noise_multiplier=noise)
        for rounds in (1, 2, 17, 300):
            acc = m.fresh_accountant()
            acc.compose(m.round_event(), rounds)
            assert m._compute_epsilon(rounds) == acc.get_epsilon(m.delta)


def test_pld_refuses_fixed_size_sampling():
    with pytest.raises(ValueError, match="RDP only"):
        _mech(sampling="fixed", accountant="pld")


def test_epsilon_grows_with_rounds_and_is_zero_before_any():
    m = _mech()
    assert m.epsilon(0) == 0.0 < m.epsilon(1) < m.epsilon(10) < m.epsilon(100)


def test_calibration_reaches_the_target_from_below():
    def make(noise):
        return _mech(noise_multiplier=noise)

    sigma = calibrate(make, target_epsilon=3.0, rounds=100)
    assert make(sigma).epsilon(100) <= 3.0
    assert make(sigma * 0.99).epsilon(100) > 3.0 * 0.99


def test_calibration_says_when_the_target_is_out_of_reach():
    with pytest.raises(ValueError, match="out of reach"):
        calibrate(lambda s: _mech(noise_multiplier=s, sampling="fixed", population=2,
                                  cohort=2), target_epsilon=1e-4, rounds=1000, high=2.0)


def test_simulated_cohort_is_reported_apart_from_the_real_guarantee():
    from fl.privacy.plan import UserPlan
    from fl.privacy.release import user_epsilons
    from fl.tracking import keys as K

    simulated = _mech(population=1_000_000, cohort=1000, delta=1e-7, simulated=True)
    out = user_epsilons(UserPlan(True, simulated, fleet_population=100, fleet_cohort=10), 20)
    assert out[K.SIM_USER_EPS] == simulated.epsilon(20)
    # the real run: noise std sigma*C*10/1000 on 10 real devices -> multiplier 0.01
    assert out[K.USER_NOISE_MULTIPLIER] == 1.0 * 10 / 1000
    assert out[K.USER_EPS] > 100 * out[K.SIM_USER_EPS]
    real_only = user_epsilons(UserPlan(True, _mech(), fleet_population=1000,
                                       fleet_cohort=20), 20)
    assert K.SIM_USER_EPS not in real_only
