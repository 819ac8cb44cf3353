"""The one-run audit: a lower bound on epsilon from guessing which canaries trained.

Steinke, Nasr and Jagielski 2023, "Privacy auditing with one (1) training run"
(arXiv 2305.08846). The game, stated as data:

* ``m`` canaries, each included in training by an independent fair coin that the
  auditor keeps secret. The neighbouring relation is *add/remove one canary*:
  flipping one coin changes the input by one canary (one photo at the photo level,
  one device at the user level), so an (epsilon, delta)-DP mechanism is
  (epsilon, delta)-DP in every coin.
* From what its adversary sees, the auditor scores every canary, then guesses
  "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest, and
  abstains on the rest: ``r = k_in + k_out`` guesses, ``v`` of them right.
* Under an (epsilon, delta)-DP mechanism, the number of right guesses is
  dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their
  Theorem 5.2; ``p_value`` is the paper's own appendix algorithm). Observing ``v``
  with p-value below ``1 - confidence`` rejects (epsilon, delta)-DP; rejecting
  epsilon rejects every smaller epsilon too, so the largest rejected epsilon is
  the lower bound.

Why one run and not many: the usual audit trains hundreds of models to estimate
false positive and false negative rates; here the m coins play that role within
one training run, at the price of a looser bound (the all-correct ceiling grows
only like log m: m = 1000 canaries, all guessed right, certify 5.78 at
delta = 1e-5). A bound far below the theoretical epsilon is therefore expected
even for a tight mechanism; a bound *above* it is a bug.

The delta term grows with m (2 m delta): more canaries do not always help. At
fedface's default photo-level delta, 0.1 / photos_max = 2.5e-3, one pre-registered
test certifies at most 2.65 (m = 100; 2.43 with m = 1000) and a search over
``symmetric(m)`` certifies nothing for any m. An audit at a smaller delta' is
valid if it is compared with the accountant's epsilon at that delta'.

Choosing k after seeing the coins: the theorem holds for guesses fixed before the
coins are revealed. ``audit`` searches a list of (k_in, k_out) candidates fixed
in advance by m alone and corrects with Bonferroni (each candidate tested at
``(1 - confidence) / len(candidates)``), which is what google-deepmind's
jax_privacy does by default (``CanaryScoreAuditor.epsilon_one_run``,
``Bonferroni()``). jax_privacy counts only the thresholds left on the data's
Pareto frontier, a data-dependent count; fedface counts every candidate, which
is never less conservative. ``audit(..., candidates=[(k_in, k_out)])`` is the
pre-registered single test with no correction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

RELATION = "add/remove one canary (each included by an independent fair coin)"
_TOLERANCE = 1e-6  # epsilon resolution of the search


@dataclass(frozen=True)
class Guesses:
    """How one guessing game ended: ``correct`` of ``guesses`` right, among
    ``canaries`` randomised canaries (abstentions are the rest)."""

    canaries: int  # m
    guesses: int  # r = k_in + k_out
    correct: int  # v

    def __post_init__(self) -> None:
        if not 0 <= self.correct <= self.guesses <= self.canaries:
            raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {self}")


def p_value(g: Guesses, epsilon: float, delta: float) -> float:
    """Probability of at least ``g.correct`` right guesses under (epsilon, delta)-DP.

    With f(j) = P[Binomial(r, q) >= j], q = e^eps / (1 + e^eps), the paper's bound
    is f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i.
    """
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    r, v = g.guesses, g.correct
    if v == 0:
        return 1.0
    q = special.expit(epsilon)
    beta = stats.binom.sf(v - 1, r, q)
    if delta == 0:
        return float(beta)
    tails = stats.binom.sf(np.arange(-1, v - 1), r, q)  # tails[j] = f(j), j = 0..v-1
    i = np.arange(1, v + 1)
    alpha = np.max((tails[v - i] - beta) / i)
    return float(min(1.0, beta + alpha * delta * 2 * g.canaries))


def epsilon_lower_bound(g: Guesses, delta: float, confidence: float = 0.95,
                        at_least: float = 0.0) -> float:
    """The largest epsilon whose (epsilon, delta)-DP claim ``g`` rejects at
    ``confidence``; ``at_least`` when even that is not rejected (0 by default).

    Bisection keeps the invariant p(low) < 1 - confidence, so what is returned is
    always a rejected epsilon (within ``_TOLERANCE`` below the supremum).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    significance = 1 - confidence
    low = at_least
    if p_value(g, low, 0.0) >= significance or p_value(g, low, delta) >= significance:
        return at_least  # delta only adds to the p-value: the delta-free test fails fast
    high = max(1.0, 2 * low)
    while p_value(g, high, delta) < significance:
        low, high = high, 2 * high
    while high - low > _TOLERANCE:
        mid = (low + high) / 2
        if p_value(g, mid, delta) < significance:
            low = mid
        else:
            high = mid
    return low


def ceiling(canaries: int, delta: float, confidence: float = 0.95, tests: int = 1) -> float:
    """The most ``canaries`` can certify: every canary guessed, every guess right,
    at the significance a search over ``tests`` candidates leaves each one."""
    significance = (1 - confidence) / tests
    return epsilon_lower_bound(Guesses(canaries, canaries, canaries), delta, 1 - significance)


def guess(scores: np.ndarray, k_in: int, k_out: int, seed: int = 0) -> np.ndarray:
    """+1 ("in") for the ``k_in`` highest scores, -1 ("out") for the ``k_out``
    lowest, 0 (abstain) elsewhere.

    Ties are broken by a seeded permutation of the canaries, never by their
    position, so a caller that lists included canaries first cannot leak the
    coins into the guesses through equal scores.
    """
    order = _ranking(np.asarray(scores, dtype=float), seed)
    m = len(order)
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"need k_in, k_out >= 0 and k_in + k_out <= {m}")
    out = np.zeros(m, dtype=np.int8)
    out[order[m - k_in:]] = 1
    out[order[:k_out]] = -1
    return out


def count(guesses: np.ndarray, included: np.ndarray) -> Guesses:
    """Score signed guesses against the secret coins (``included``, booleans)."""
    guesses, included = np.asarray(guesses), np.asarray(included, dtype=bool)
    if guesses.shape != included.shape:
        raise ValueError("one guess per canary")
    truth = np.where(included, 1, -1)
    return Guesses(len(guesses), int(np.count_nonzero(guesses)),
                   int(np.sum(guesses == truth)))


def ks(largest: int, per_octave: int | None = 2) -> list[int]:
    """k = largest, largest / 2^(1/per_octave), ... down to 1 (rounded, distinct),
    or every k from 1 to largest when ``per_octave`` is None."""
    if largest < 1:
        return []
    if per_octave is None:
        return list(range(1, largest + 1))
    steps = int(np.floor(np.log2(largest) * per_octave)) + 1
    grid = np.round(largest * 2.0 ** (-np.arange(steps) / per_octave)).astype(int)
    return sorted(set(grid.tolist()) | {1}, reverse=True)


def symmetric(canaries: int, per_octave: int | None = 2) -> list[tuple[int, int]]:
    """Guess "in" for the top k and "out" for the bottom k: the default.

    k runs over a geometric grid up to m // 2 plus m/2 - j sqrt(m)/2, j = 1, 2, 3:
    the coins leave min(included, excluded) about that far below m/2 (one to three
    standard deviations), which is where a perfect attack's largest all-correct k
    lies. About 2 log2(m) + 3 candidates, fixed by m alone.

    Why a coarse grid: every candidate costs Bonferroni significance, and the
    paper's delta term (2 m delta times a binomial mass) must stay below the
    per-candidate significance. With m = 1000 and delta = 1e-5, searching every k
    (500 candidates) caps the bound at 1.57; this grid (21 candidates) at 4.90.
    """
    half = canaries // 2
    near_half = {round(canaries / 2 - j * math.sqrt(canaries) / 2) for j in (1, 2, 3)}
    grid = set(ks(half, per_octave)) | {k for k in near_half if 1 <= k <= half}
    return [(k, k) for k in sorted(grid, reverse=True)]


def one_sided(canaries: int, per_octave: int | None = None) -> list[tuple[int, int]]:
    """Guess "in" for the top k and never "out"; every k by default, which is the
    family jax_privacy's ``epsilon_one_run`` searches."""
    return [(k, 0) for k in ks(canaries, per_octave)]


@dataclass(frozen=True)
class OneRunAudit:
    """An audit's outcome, with what the runner logs (``audit/canaries``,
    ``audit/correct_guesses``, ``audit/*_eps_lower``)."""

    epsilon_lower: float
    guesses: Guesses  # the best candidate's game (nothing rejected: the closest to it)
    k_in: int
    k_out: int
    delta: float
    confidence: float  # overall, after the correction
    candidates: int  # how many (k_in, k_out) were searched (the Bonferroni factor)
    ceiling: float  # the most these canaries can certify under the same correction


def audit(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray,
          delta: float, confidence: float = 0.95,
          candidates: Sequence[tuple[int, int]] | None = None, seed: int = 0) -> OneRunAudit:
    """The best lower bound over ``candidates`` (default ``symmetric(m)``), each
    candidate tested at ``(1 - confidence) / len(candidates)`` (Bonferroni), so the
    reported bound holds at ``confidence`` although k was chosen after the coins.

    Higher scores must mean "more likely in" (negate a loss). Candidates must be
    fixed by m alone, never by the scores or coins.
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != (m,) or m == 0:
        raise ValueError("need one score and one coin per canary, and at least one canary")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    candidates = list(symmetric(m) if candidates is None else candidates)
    if not candidates:
        raise ValueError("no candidates")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    per_test = 1 - (1 - confidence) / len(candidates)
    ranked = included[_ranking(scores, seed)]  # coins, lowest score first
    in_from_top = np.concatenate([[0], np.cumsum(ranked[::-1])])  # included among top k
    out_from_bottom = np.concatenate([[0], np.cumsum(~ranked)])  # excluded among bottom k
    best_eps, best, best_k, best_p = 0.0, Guesses(m, 0, 0), (0, 0), 1.0
    for k_in, k_out in candidates:
        if k_in < 0 or k_out < 0 or k_in + k_out > m:
            raise ValueError(f"candidate ({k_in}, {k_out}) does not fit {m} canaries")
        g = Guesses(m, k_in + k_out, int(in_from_top[k_in] + out_from_bottom[k_out]))
        if g.guesses == 0 or g.correct / g.guesses <= special.expit(best_eps):
            # Its p-value at best_eps is at least 1/2 (v <= rq is below the binomial's
            # median), so it cannot reject best_eps at any confidence above 1/2.
            continue
        eps = epsilon_lower_bound(g, delta, per_test, at_least=best_eps)
        if eps > best_eps:
            best_eps, best, best_k = eps, g, (k_in, k_out)
        elif best_eps == 0 and (p := p_value(g, 0.0, delta)) < best_p:
            best, best_k, best_p = g, (k_in, k_out), p  # nothing rejected: the closest
    return OneRunAudit(best_eps, best, best_k[0], best_k[1], delta, confidence,
                       len(candidates), ceiling(m, delta, confidence, len(candidates)))


def _ranking(scores: np.ndarray, seed: int) -> np.ndarray:
    """Canary indices from lowest to highest score, ties in seeded random order."""
    tiebreak = np.random.default_rng(seed).permutation(len(scores))
    return np.lexsort((tiebreak, scores))
