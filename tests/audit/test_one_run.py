"""The one-run lower bound against independent references and its own promises.

References: the paper's appendix algorithm (written out below as printed: a loop
of binomial masses and a 30-step bisection), google-deepmind's jax_privacy 2.0.0
(values pinned from ``jax_privacy.auditing._epsilon_one_run``, and compared live
when jax_privacy is importable), and the delta = 0 closed form.
"""

from __future__ import annotations

import importlib.util
import itertools
import math

import numpy as np
import pytest
from scipy import special, stats

from fl.audit.one_run import (
    Guesses,
    audit,
    ceiling,
    count,
    epsilon_lower_bound,
    guess,
    ks,
    one_sided,
    p_value,
    symmetric,
)


def _paper_p_value(m, r, v, eps, delta):
    """Steinke, Nasr and Jagielski 2023, appendix code, as printed."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1)


def _paper_eps(m, r, v, delta, p):
    eps_min, eps_max = 0.0, 1.0
    while _paper_p_value(m, r, v, eps_max, delta) < p:
        eps_max += 1
    for _ in range(30):
        eps = (eps_min + eps_max) / 2
        if _paper_p_value(m, r, v, eps, delta) < p:
            eps_min = eps
        else:
            eps_max = eps
    return eps_min


# (m, r, v, delta) -> jax_privacy 2.0.0 _epsilon_one_run(0, m, r, v, 0.05, delta)
JAX_PRIVACY = {
    (1000, 1000, 1000, 1e-5): 5.782283131572193,
    (1000, 1000, 1000, 0.0): 5.8090683371730325,
    (1000, 500, 500, 1e-5): 5.087548532789208,
    (1000, 1000, 900, 1e-5): 2.020645594168416,
    (100, 100, 100, 1e-5): 3.4902158675692982,
    (10000, 10000, 10000, 1e-5): 7.834303246157422,
}
# small games for the printed loop, which is slow (one scalar binomial mass a step)
PAPER_GAMES = [(100, 100, 100, 1e-5), (100, 60, 55, 0.0), (200, 150, 140, 1e-4), (50, 50, 45, 1e-3)]


@pytest.mark.parametrize("game", sorted(JAX_PRIVACY))
def test_bound_matches_jax_privacy_and_the_papers_algorithm(game):
    m, r, v, delta = game
    ours = epsilon_lower_bound(Guesses(m, r, v), delta, 0.95)
    assert ours == pytest.approx(JAX_PRIVACY[game], abs=2e-6)


@pytest.mark.parametrize("game", PAPER_GAMES)
def test_bound_matches_the_papers_algorithm(game):
    m, r, v, delta = game
    ours = epsilon_lower_bound(Guesses(m, r, v), delta, 0.95)
    assert ours == pytest.approx(_paper_eps(m, r, v, delta, 0.05), abs=2e-6)


def test_p_value_matches_the_papers_loop():
    rng = np.random.default_rng(0)
    for _ in range(40):
        m = int(rng.integers(1, 150))
        r = int(rng.integers(0, m + 1))
        v = int(rng.integers(0, r + 1))
        eps, delta = float(rng.uniform(0, 6)), float(rng.choice([0, 1e-6, 1e-3, 0.05]))
        assert p_value(Guesses(m, r, v), eps, delta) == pytest.approx(
            _paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("m", [10, 100, 1000])
def test_all_correct_without_delta_is_the_binomial_closed_form(m):
    """delta = 0, all m right: p = q^m, so the bound solves q = 0.05^(1/m)."""
    closed = float(special.logit(0.05 ** (1 / m)))
    assert epsilon_lower_bound(Guesses(m, m, m), 0.0) == pytest.approx(closed, abs=2e-6)


def test_monotone_in_correct_guesses_and_never_above_the_ceiling():
    m, delta = 400, 1e-5
    top = ceiling(m, delta)
    bounds = [epsilon_lower_bound(Guesses(m, m, v), delta) for v in range(200, m + 1, 10)]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(bounds))
    assert max(bounds) == pytest.approx(top, abs=1e-6) and max(bounds) <= top + 1e-6
    # fewer guesses, all right, certify less than all m right
    assert epsilon_lower_bound(Guesses(m, 100, 100), delta) < top


def test_delta_and_confidence_only_weaken_the_bound():
    g = Guesses(1000, 600, 560)
    assert (epsilon_lower_bound(g, 0.0) >= epsilon_lower_bound(g, 1e-5)
            >= epsilon_lower_bound(g, 1e-3))
    assert epsilon_lower_bound(g, 1e-5, 0.9) >= epsilon_lower_bound(g, 1e-5, 0.99)


def test_chance_level_certifies_nothing():
    assert epsilon_lower_bound(Guesses(1000, 1000, 500), 1e-5) == 0.0
    assert epsilon_lower_bound(Guesses(1000, 1000, 530), 1e-5) < 0.05
    assert epsilon_lower_bound(Guesses(1000, 0, 0), 1e-5) == 0.0


def test_guess_and_count_score_signed_guesses_against_the_coins():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.3])
    g = guess(scores, k_in=2, k_out=2)
    assert g.tolist() == [1, -1, 0, 1, -1, 0]
    assert count(g, np.array([1, 0, 1, 0, 0, 1], bool)) == Guesses(6, 4, 3)


def test_ties_never_follow_the_order_of_the_canaries():
    """All scores equal, included canaries listed first: guessing by position
    would be all right; a seeded tie-break makes it chance."""
    m = 400
    included = np.arange(m) < m // 2
    g = count(guess(np.zeros(m), m // 2, m // 2), included)
    assert abs(g.correct - m / 2) < 4 * math.sqrt(m) / 2
    assert audit(np.zeros(m), included, 1e-5).epsilon_lower == 0.0


def test_candidate_grids_are_fixed_by_m_alone():
    assert ks(500)[:4] == [500, 354, 250, 177] and ks(500)[-1] == 1 and len(ks(500)) == 18
    assert symmetric(1000) == [(k, k) for k in sorted(set(ks(500)) | {484, 468, 453},
                                                      reverse=True)]
    assert one_sided(5) == [(k, 0) for k in range(1, 6)]


def test_perfect_attack_reaches_the_ceiling_and_a_weak_one_stays_below():
    rng = np.random.default_rng(3)
    m, delta = 1000, 1e-5
    coins = rng.random(m) < 0.5
    perfect = audit(coins.astype(float), coins, delta)
    assert perfect.guesses.correct == perfect.guesses.guesses > 0.9 * m
    assert perfect.epsilon_lower == pytest.approx(perfect.ceiling, rel=0.02)
    assert perfect.candidates == len(symmetric(m))
    weak = audit(rng.normal(size=m) + 1.0 * coins, coins, delta)
    assert 0 < weak.epsilon_lower < perfect.epsilon_lower
    # a pre-registered single test is not corrected, so its ceiling is higher
    single = audit(coins.astype(float), coins, delta, candidates=[(400, 400)])
    assert single.ceiling == pytest.approx(ceiling(m, delta), abs=1e-6)
    assert single.ceiling > perfect.ceiling


def _randomized_response(rng, coins, eps, delta):
    """An (eps, delta)-DP release of each coin: with probability delta the coin
    itself, otherwise eps-randomised response."""
    keep = rng.random(coins.shape) < special.expit(eps)
    answer = np.where(keep, coins, ~coins)
    leak = rng.random(coins.shape) < delta
    return np.where(leak, coins, answer).astype(float)


@pytest.mark.parametrize("eps,delta", [(1.0, 0.0), (2.0, 1e-3)])
def test_a_truly_dp_mechanism_is_flagged_in_at_most_beta_of_trials(eps, delta):
    """Monte Carlo: randomised response is exactly (eps, delta)-DP per coin; the
    bound may exceed eps in at most 5% of trials (plus three standard errors)."""
    rng = np.random.default_rng(11)
    trials, searched, m = 400, 60, 200
    over_fixed = over_searched = 0
    for t in range(trials):
        coins = rng.random(m) < 0.5
        released = _randomized_response(rng, coins, eps, delta)
        fixed = count(np.where(released > 0, 1, -1), coins)  # guess every canary
        over_fixed += p_value(fixed, eps, delta) < 0.05
        if t < searched:  # the searched audit costs more; fewer trials
            over_searched += audit(released, coins, delta, seed=t).epsilon_lower > eps
    assert over_fixed / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert over_searched / searched <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / searched)


def test_a_leak_above_the_claim_is_caught():
    """The test has power: 6-DP randomised response audited against a claim of 2."""
    rng = np.random.default_rng(12)
    coins = rng.random(500) < 0.5
    result = audit(_randomized_response(rng, coins, 6.0, 0.0), coins, 1e-5)
    assert result.epsilon_lower > 2.0


def test_inputs_are_checked():
    with pytest.raises(ValueError):
        Guesses(10, 5, 6)
    with pytest.raises(ValueError):
        audit([0.1, 0.2], [True], 1e-5)
    with pytest.raises(ValueError):
        audit([0.1, float("nan")], [True, False], 1e-5)
    with pytest.raises(ValueError):
        audit([0.1, 0.2], [True, False], 1e-5, candidates=[(2, 1)])


@pytest.mark.skipif(importlib.util.find_spec("jax_privacy") is None,
                    reason="jax_privacy is not installed (it needs jax; not a fedface dependency)")
def test_live_against_jax_privacy():
    """The same fixed game through jax_privacy's public API (an explicit threshold,
    one-sided) and through ours."""
    from jax_privacy import auditing

    rng = np.random.default_rng(5)
    for shift, k in [(1.0, 50), (2.0, 120), (4.0, 300)]:
        coins = rng.random(1000) < 0.5
        scores = rng.normal(size=1000) + shift * coins
        threshold = np.sort(scores)[-k]
        theirs = auditing.CanaryScoreAuditor(scores[coins], scores[~coins]).epsilon_one_run(
            0.05, 1e-5, threshold_strategy=auditing.Explicit(threshold))
        ours = audit(scores, coins, 1e-5, candidates=[(k, 0)]).epsilon_lower
        assert ours == pytest.approx(theirs, abs=2e-6)
        for v in range(0, k + 1, 7):
            g = Guesses(1000, k, v)
            assert p_value(g, 1.5, 1e-5) == pytest.approx(
                auditing._one_run_p_value(1000, k, v, 1.5, 1e-5), rel=1e-12, abs=1e-15)
