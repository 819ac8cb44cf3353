"""The user-level one-shot estimate: canary devices and the cosine statistic.

Andrew, Kairouz, Oh, Oprea, McMahan and Suriyakumar 2023, "One-shot empirical
privacy estimation for federated learning" (arXiv 2302.03098). The game, stated
as data:

* A canary device sends, every round it is sampled, a fixed random unit
  direction u_i in the space of the shared coordinates devices train, scaled to
  the clip C, instead of a real update. Its norm is exactly C, so clipping leaves
  it alone and it moves the released sum as far as one user can. The
  neighbouring relation is *add/remove one user*: a canary inserted or never
  inserted.
* The adversary sees only the released models (not any device's update): the
  statistic is the cosine between u_i and the final model change.
* A direction never inserted is independent of training, so its cosine with any
  fixed vector is that of a uniformly random unit vector in d dimensions: mean 0,
  variance exactly 1/d, and close to N(0, 1/d) for d in the thousands. Held-out
  canaries measure it instead when given.
* Fit Gaussians to the inserted cosines and to the null, and estimate the
  epsilon at delta of telling them apart. By default (``spread="pooled"``) both
  get one spread, the Gaussian mechanism's shape (a canary shifts its cosine,
  the noise spreads every cosine alike): mu = (mean_in - mean_out) / spread and
  the estimate is mu-GDP's epsilon (``gdp_epsilon``, equal to dp-accounting's
  Gaussian mechanism at noise 1/mu). ``spread="separate"`` fits each its own, as
  the authors' released code does (google-research/federated ``one_shot_epe``,
  ``epsilon_two_gaussians`` here), which is noisier at small delta.

What the number is: an *estimate*, not a bound. For the Gaussian mechanism seen
once it recovers the true epsilon as d grows (the paper's theorem); over many
rounds with only the final model observed it estimates what that adversary
learns, which is why it sits far below the accountant's epsilon (the accountant
assumes every intermediate release is seen). Its interval is a percentile
bootstrap over canaries: the sampling spread of the estimate, not a confidence
bound on the true epsilon.

Resolution: with n canaries per group the separation mu is known to about
sqrt(2 / n) (held-out null) or sqrt(1 / n) (closed-form null), which near zero is
about 4.3 sqrt(2 / n) in epsilon at delta = 1e-5: +- 0.6 with 100 canaries.

Sign: fedface adds the (noised) mean update to the model, so an inserted
canary's cosine is positive; compute the change as final minus initial weights
of the shared coordinates that DP-FedAvg releases.

Directions are regenerated from (seed, index) with numpy's PCG64, so a canary
device needs only two integers and the auditor never stores a d-by-n matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize, special

RELATION = "add/remove one user (a canary device inserted or never inserted)"
CLOSED_FORM_MIN_DIM = 1000  # below this N(0, 1/d) is a poor fit to the exact null


def canary_direction(seed: int, index: int, dim: int) -> np.ndarray:
    """Canary ``index``'s unit direction in ``dim`` dimensions (uniform on the
    sphere: a normalised standard Gaussian), the same wherever it is rebuilt."""
    if dim < 2:
        raise ValueError("a direction needs at least 2 dimensions")
    v = np.random.default_rng([seed, index]).standard_normal(dim)
    return v / np.linalg.norm(v)


def keys_dim(template: Mapping[str, torch.Tensor], keys: Iterable[str]) -> int:
    """d: the number of coordinates in ``keys`` (the shared weights devices train)."""
    return int(sum(template[k].numel() for k in sorted(keys)))


def flatten(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> np.ndarray:
    """``keys`` of a state dict as one float64 vector, keys in sorted order."""
    return np.concatenate([state[k].detach().to(torch.float64).reshape(-1).cpu().numpy()
                           for k in sorted(keys)])


def canary_update(seed: int, index: int, clip: float, template: Mapping[str, torch.Tensor],
                  keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """What canary device ``index`` adds to the global weights: its direction
    times ``clip``, shaped like ``template`` on ``keys`` (sorted, as ``flatten``)."""
    keys = sorted(keys)
    flat = canary_direction(seed, index, keys_dim(template, keys)) * clip
    out, start = {}, 0
    for k in keys:
        n = template[k].numel()
        out[k] = torch.from_numpy(flat[start:start + n].copy()).reshape(template[k].shape).to(
            template[k].dtype)
        start += n
    return out


def model_change(initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor],
                 keys: Iterable[str]) -> np.ndarray:
    """The final model minus the initial one on ``keys``, flat (as ``flatten``)."""
    return flatten(final, keys) - flatten(initial, keys)


def cosines(seed: int, indices: Iterable[int], change: np.ndarray) -> np.ndarray:
    """cos(u_i, change) for each canary index, one direction in memory at a time."""
    change = np.asarray(change, dtype=np.float64)
    norm = np.linalg.norm(change)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("the model change must be finite and non-zero")
    return np.array([canary_direction(seed, i, change.size) @ change / norm for i in indices])


def _log_delta(p: tuple[float, float], q: tuple[float, float], eps: float) -> float:
    """log of sup_S P(S) - e^eps Q(S) for P = N(p), Q = N(q) (mean, std).

    The privacy loss L(y) = log p(y)/q(y) = a y^2 + b y + c is quadratic, so the
    optimal S = {L > eps} is a half-line, the outside of two roots, or the inside.
    """
    (m1, s1), (m0, s0) = p, q
    a = 0.5 / s0**2 - 0.5 / s1**2
    b = m1 / s1**2 - m0 / s0**2
    c = 0.5 * m0**2 / s0**2 - 0.5 * m1**2 / s1**2 + np.log(s0 / s1)

    def log_mass(mean: float, std: float) -> float:
        def below(t: float) -> float:  # log P[Y < t]
            return special.log_ndtr((t - mean) / std)

        def above(t: float) -> float:  # log P[Y > t]
            return special.log_ndtr((mean - t) / std)

        if a == 0:  # equal spreads: a half-line
            if b == 0:
                return 0.0 if c > eps else -np.inf
            t = (eps - c) / b
            return above(t) if b > 0 else below(t)
        disc = b * b - 4 * a * (c - eps)
        if disc <= 0:
            return 0.0 if a > 0 else -np.inf  # L > eps everywhere, or nowhere
        # the stable pair of roots: no cancellation when the spreads nearly agree
        r = -0.5 * (b + np.copysign(np.sqrt(disc), b))
        lo, hi = sorted((r / a, (c - eps) / r))
        if a > 0:  # outside the roots
            return np.logaddexp(below(lo), above(hi))
        left, right = below(lo), below(hi)
        with np.errstate(divide="ignore"):  # equal masses: log 0 = -inf, no mass
            return right + np.log1p(-np.exp(left - right)) if right > left else -np.inf

    log_p, log_q = log_mass(m1, s1), log_mass(m0, s0)
    if log_p == -np.inf or eps + log_q >= log_p:
        return -np.inf
    return log_p + np.log1p(-np.exp(eps + log_q - log_p))


def epsilon_two_gaussians(mean0: float, std0: float, mean1: float, std1: float,
                          delta: float) -> float:
    """The smallest epsilon with which N(mean0, std0^2) and N(mean1, std1^2) are
    (epsilon, delta)-indistinguishable, both ways round."""
    if std0 <= 0 or std1 <= 0:
        raise ValueError("both spreads must be positive")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    target = np.log(delta)

    def excess(eps: float) -> float:
        return max(_log_delta((mean1, std1), (mean0, std0), eps),
                   _log_delta((mean0, std0), (mean1, std1), eps)) - target

    if excess(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) > 0:
        low, high = high, 2 * high
    return float(optimize.brentq(excess, low, high, xtol=1e-9, rtol=1e-12))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon at delta of mu-GDP (the Gaussian mechanism with sensitivity / noise
    std = mu): the equal-spread case of ``epsilon_two_gaussians``."""
    return 0.0 if mu == 0 else epsilon_two_gaussians(0.0, 1.0, abs(mu), 1.0, delta)


SPREADS = ("pooled", "separate")


@dataclass(frozen=True)
class UserEstimate:
    """The canary-device estimate, with what the runner logs
    (``audit/user_eps_lower``) and reports."""

    epsilon: float
    interval: tuple[float, float]  # percentile bootstrap over canaries
    confidence: float
    delta: float
    spread: str  # "pooled" (the Gaussian mechanism's shape) or "separate"
    mean_in: float
    std_in: float
    mean_out: float
    std_out: float
    mu: float  # (mean_in - mean_out) / the spread used ("pooled": the common one)
    inserted: int
    held_out: int  # 0: the closed-form null N(0, 1/d)
    dim: int | None


def estimate(inserted: Sequence[float] | np.ndarray,
             held_out: Sequence[float] | np.ndarray | None = None, *, delta: float,
             dim: int | None = None, confidence: float = 0.95, spread: str = "pooled",
             resamples: int = 1000, seed: int = 0) -> UserEstimate:
    """Epsilon at ``delta`` from the cosines of inserted canaries, against the
    held-out canaries' cosines or, when none are given, the null N(0, 1/dim).

    ``spread``: how the two Gaussians are fitted.

    * ``pooled`` (default): the Gaussian mechanism's shape, in which a canary
      shifts its cosine and the noise spreads inserted and null cosines alike; one
      spread (the null's exact 1/sqrt(d), or the pooled sample spread of both
      groups) and the estimate is mu-GDP with mu = (mean_in - mean_out) / spread.
      A negative separation is noise (a canary can only pull the model towards
      itself) and estimates 0.
    * ``separate``: each group its own spread, as the authors' released code does
      (``epsilon_closed_form_null_gaussian_alt``). Unequal spreads make the
      privacy loss quadratic, so at small delta sampling noise in the two spreads
      alone reads as epsilon (1.1 at delta = 1e-5 for 200 + 200 canaries never
      inserted); prefer it only with many canaries.

    The interval resamples the inserted (and held-out) cosines with replacement
    ``resamples`` times and takes the central ``confidence`` percentiles of the
    estimate (``pooled``: of mu, then converted; epsilon is increasing in mu).
    """
    cos_in = np.asarray(inserted, dtype=np.float64)
    cos_out = None if held_out is None else np.asarray(held_out, dtype=np.float64)
    if cos_in.size < 2 or (cos_out is not None and cos_out.size < 2):
        raise ValueError("need at least two cosines per group")
    if cos_out is None and (dim is None or dim < CLOSED_FORM_MIN_DIM):
        raise ValueError(f"without held-out canaries the null is N(0, 1/dim), which needs "
                         f"dim >= {CLOSED_FORM_MIN_DIM}; got dim={dim}")
    if spread not in SPREADS:
        raise ValueError(f"spread {spread!r}: choose one of {SPREADS}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    rng = np.random.default_rng(seed)
    boot_in = rng.choice(cos_in, (resamples, cos_in.size))
    boot_out = None if cos_out is None else rng.choice(cos_out, (resamples, cos_out.size))
    fit = _fit(cos_in, cos_out, dim)
    boot = _fit(boot_in, boot_out, dim)
    tail = (1 - confidence) / 2
    if spread == "pooled":
        mus = _pooled_mu(*fit, cos_in.size, 0 if cos_out is None else cos_out.size)
        boot_mus = _pooled_mu(*boot, cos_in.size, 0 if cos_out is None else cos_out.size)
        mu = float(mus)
        point = gdp_epsilon(max(mu, 0.0), delta)
        low, high = (gdp_epsilon(max(float(x), 0.0), delta)
                     for x in np.quantile(boot_mus, [tail, 1 - tail]))
    else:
        mean_in, std_in, mean_out, std_out = fit
        mu = float((mean_in - mean_out) / std_out)
        point = epsilon_two_gaussians(mean_out, std_out, mean_in, std_in, delta)
        draws = [epsilon_two_gaussians(mo, so, mi, si, delta) for mi, si, mo, so in zip(*boot)]
        low, high = np.quantile(draws, [tail, 1 - tail])
    return UserEstimate(point, (float(low), float(high)), confidence, delta, spread,
                        *(float(np.asarray(x)) for x in fit), mu, int(cos_in.size),
                        0 if cos_out is None else int(cos_out.size), dim)


def _fit(cos_in: np.ndarray, cos_out: np.ndarray | None, dim: int | None):
    """Means and spreads along the last axis (one row per bootstrap draw); the
    closed-form null is mean 0, spread 1/sqrt(dim)."""
    mean_in, std_in = cos_in.mean(axis=-1), cos_in.std(axis=-1, ddof=1)
    if cos_out is None:
        return mean_in, std_in, np.zeros_like(mean_in), np.full_like(mean_in, dim**-0.5)
    return mean_in, std_in, cos_out.mean(axis=-1), cos_out.std(axis=-1, ddof=1)


def _pooled_mu(mean_in, std_in, mean_out, std_out, n_in: int, n_out: int):
    """Separation over the common spread: the null's own when it is closed-form
    (n_out = 0), else the pooled sample spread of both groups."""
    if n_out == 0:
        return (mean_in - mean_out) / std_out
    pooled = np.sqrt(((n_in - 1) * std_in**2 + (n_out - 1) * std_out**2) / (n_in + n_out - 2))
    return (mean_in - mean_out) / pooled
