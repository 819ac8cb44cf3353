"""User-level DP at the server (DP-FedAvg) and its fleet accountant.

The unit is a *user* (a device with all its photos). Each round releases one
Gaussian mechanism on the sum of clipped device updates, subsampled by the
device sampling actually used, so the accountant composes one event per round:

* Poisson sampling (each device joins independently with probability q = k/N):
  ``PoissonSampledDpEvent``, neighbouring relation add/remove one user.
* Fixed-size sampling without replacement (exactly k of N): a
  ``SampledWithoutReplacementDpEvent``, neighbouring relation replace one user
  (the relation that amplification result holds for; RDP only).

N is the real number of devices, or, in a *simulated cohort*, the population the
simulation stands in for; every such number is labelled as a simulation.
Epsilons come from Google's dp-accounting (RDP or PLD).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import dp_accounting as dpa
import numpy as np
from dp_accounting import mechanism_calibration
from dp_accounting.rdp import rdp_privacy_accountant as rdp_accountant

# dp-accounting warns when it drops an RDP order it cannot evaluate; dropping an
# order can only make the reported epsilon larger, so the warning is noise here.
logging.getLogger("absl").setLevel(logging.ERROR)

SAMPLING = ("poisson", "fixed")
USER_ACCOUNTANTS = ("rdp", "pld")
RELATION = {"poisson": "add/remove one user", "fixed": "replace one user"}


@dataclass(frozen=True)
class UserMechanism:
    """One round's user-level mechanism, as accounted."""

    noise_multiplier: float
    clip: float
    sampling: str  # "poisson" | "fixed"
    population: int  # N: devices that could be sampled
    cohort: int  # k: devices per round (expected k for Poisson)
    delta: float
    accountant: str = "rdp"
    simulated: bool = False  # population/cohort stand for a larger deployment

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING:
            raise ValueError(f"user-level sampling {self.sampling!r}: choose one of {SAMPLING}")
        if self.accountant not in USER_ACCOUNTANTS:
            raise ValueError(f"user-level accountant {self.accountant!r}: choose one of "
                             f"{USER_ACCOUNTANTS}")
        if self.sampling == "fixed" and self.accountant != "rdp":
            raise ValueError("fixed-size sampling is accounted with RDP only (dp-accounting's "
                             "PLD has no sampling-without-replacement event); use rdp")
        if not 1 <= self.cohort <= self.population:
            raise ValueError(f"cohort {self.cohort} must be between 1 and the population "
                             f"{self.population}")

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.population

    @property
    def relation(self) -> str:
        return RELATION[self.sampling]

    def round_event(self) -> dpa.DpEvent:
        """One round as a dp-accounting event.

        dp-accounting's noise multiplier is noise std / L2 sensitivity *under the
        event's neighbouring relation*. Adding or removing one user changes the
        sum of updates clipped to C by at most C; replacing one user changes it by
        up to 2C. With noise std sigma*C, fixed-size (replace-one) sampling is
        therefore accounted with multiplier sigma/2 (checked in the tests against
        the unamplified Gaussian).
        """
        if self.sampling == "poisson":
            return dpa.PoissonSampledDpEvent(self.sample_rate,
                                             dpa.GaussianDpEvent(self.noise_multiplier))
        return dpa.SampledWithoutReplacementDpEvent(
            self.population, self.cohort, dpa.GaussianDpEvent(self.noise_multiplier / 2))

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` released aggregates."""
        return _user_epsilon(self, rounds)

    def fresh_accountant(self) -> dpa.PrivacyAccountant:
        """An empty accountant of this mechanism's kind and neighbouring relation."""
        if self.accountant == "pld":
            return dpa.pld.PLDAccountant()
        relation = (dpa.NeighboringRelation.ADD_OR_REMOVE_ONE if self.sampling == "poisson"
                    else dpa.NeighboringRelation.REPLACE_ONE)
        return dpa.rdp.RdpAccountant(neighboring_relation=relation)

    def _compute_epsilon(self, rounds: int) -> float:
        if rounds <= 0:
            return 0.0
        if self.accountant == "rdp":
            orders, one_round = _one_round_rdp(self)
            return float(rdp_accountant.compute_epsilon(orders, rounds * one_round,
                                                        self.delta)[0])
        acc = self.fresh_accountant()
        acc.compose(self.round_event(), rounds)
        return float(acc.get_epsilon(self.delta))


@lru_cache(maxsize=1024)
def _user_epsilon(mechanism: UserMechanism, rounds: int) -> float:
    """Memoised: the server asks for epsilon(r) when checking the budget before
    round r and again when logging it after."""
    return mechanism._compute_epsilon(rounds)


@lru_cache(maxsize=64)
def _one_round_rdp(mechanism: UserMechanism) -> tuple[tuple[float, ...], np.ndarray]:
    """One round's RDP curve (orders, values), computed once per mechanism.

    Why: evaluating a subsampled Gaussian's RDP at every order takes ~0.1 s, and
    the server needs epsilon(r) before every round r, while the devices wait.
    dp-accounting's ``RdpAccountant`` composes ``count`` identical events as
    ``count * rdp`` of one (its ``_compose``) and turns the curve into epsilon
    with the module's public ``compute_epsilon``; this does the same two steps
    with the one-event curve kept, so epsilon(r) is the same number
    (tests/privacy/test_user_level.py checks it against a fresh accountant).
    """
    acc = mechanism.fresh_accountant()
    acc.compose(mechanism.round_event(), 1)
    curve = np.array(acc.rdp, dtype=float)
    curve.flags.writeable = False
    return tuple(acc.orders), curve


def calibrate(make: Callable[[float], UserMechanism], target_epsilon: float, rounds: int,
              low: float = 0.05, high: float = 50.0, tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier in ``[low, high]`` (to within ``tolerance *
    low``, absolute) whose epsilon after ``rounds`` releases is at most the target.

    ``make(noise)`` builds the round's mechanism; dp-accounting's
    ``calibrate_dp_mechanism`` (Brent's method, with its own guarantee that the
    returned value meets the target) searches ``[low, high]``. Raises when even
    ``high`` cannot reach the target.
    """
    reference = make(high)
    if reference.epsilon(rounds) > target_epsilon:
        raise ValueError(f"target epsilon {target_epsilon} is out of reach over {rounds} "
                         f"rounds even with noise multiplier {high}; plan fewer rounds or "
                         "raise the target")
    if make(low).epsilon(rounds) <= target_epsilon:
        return low  # even the least noise searched meets the target
    return float(mechanism_calibration.calibrate_dp_mechanism(
        make_fresh_accountant=reference.fresh_accountant,
        make_event_from_param=lambda noise: dpa.SelfComposedDpEvent(
            make(noise).round_event(), rounds),
        target_epsilon=target_epsilon, target_delta=reference.delta,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(low, high),
        tol=tolerance * low))
