"""The run's privacy plan: both units resolved from the config before training.

Resolving means: deltas that follow the data when not given, and noise
multipliers calibrated from a target epsilon when not given. The plan is logged
(MLflow params ``privacy.plan.*``) so a reviewer sees the values actually used.

Defaults for delta are an order of magnitude below 1/n, where n is the number of
units protected: photos on the largest device (photo level), devices in the fleet
or simulated population (user level). Larger configured deltas are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig
from opacus.accountants.utils import get_noise_multiplier

from fl.privacy.user_level import UserMechanism, calibrate


@dataclass(frozen=True)
class PhotoPlan:
    enabled: bool
    noise_multiplier: float = 0.0
    max_grad_norm: float = 0.0
    delta: float = 0.0
    accountant: str = "rdp"
    budget_epsilon: float = 0.0  # 0: none
    target_epsilon: float | None = None  # set when the noise was calibrated


@dataclass(frozen=True)
class UserPlan:
    enabled: bool
    mechanism: UserMechanism | None = None
    budget_epsilon: float = 0.0
    target_epsilon: float | None = None
    rounds: int = 0

    @property
    def simulated(self) -> bool:
        return bool(self.mechanism and self.mechanism.simulated)


@dataclass(frozen=True)
class PrivacyPlan:
    photo: PhotoPlan
    user: UserPlan
    noise: str = "seeded"  # privacy.noise (fl.privacy.noise): "secure" | "seeded"

    def params(self) -> dict[str, str]:
        """MLflow params of the resolved plan (simulated values say so)."""
        out = {"privacy.plan.photo_enabled": str(self.photo.enabled),
               "privacy.plan.user_enabled": str(self.user.enabled)}
        if self.photo.enabled:
            out.update({"privacy.plan.photo_noise_multiplier": f"{self.photo.noise_multiplier:.6g}",
                        "privacy.plan.photo_delta": f"{self.photo.delta:.6g}",
                        "privacy.plan.photo_budget_epsilon": f"{self.photo.budget_epsilon:.6g}",
                        "privacy.plan.photo_noise_calibrated": str(
                            self.photo.target_epsilon is not None)})
        if self.user.enabled:
            m = self.user.mechanism
            tag = " (simulated deployment)" if m.simulated else ""
            out.update({"privacy.plan.user_noise_multiplier": f"{m.noise_multiplier:.6g}",
                        "privacy.plan.user_delta": f"{m.delta:.6g}",
                        "privacy.plan.user_sampling": m.sampling,
                        "privacy.plan.user_population": f"{m.population}{tag}",
                        "privacy.plan.user_cohort": f"{m.cohort}{tag}",
                        "privacy.plan.user_budget_epsilon": f"{self.user.budget_epsilon:.6g}",
                        "privacy.plan.user_noise_calibrated": str(
                            self.user.target_epsilon is not None)})
        return out


def _limit(budget: float, target: float) -> float:
    """A target epsilon is also a hard limit; a tighter configured budget stays."""
    return min(budget, target) if budget > 0 else target


def default_delta(units: int) -> float:
    """An order of magnitude below 1/units."""
    return 0.1 / max(units, 1)


def planned_participations(cfg: DictConfig) -> int:
    """Expected rounds a device trains in (used to calibrate photo-level noise)."""
    f = cfg.fleet
    return max(1, math.ceil(f.rounds * f.devices_per_round / f.num_devices))


def photo_plan(cfg: DictConfig) -> PhotoPlan:
    p = cfg.privacy.photo
    if not p.enabled:
        return PhotoPlan(enabled=False)
    delta = float(p.delta) if p.delta is not None else default_delta(cfg.data.photos_max)
    noise, target = p.noise_multiplier, p.target_epsilon
    budget = float(p.budget_epsilon or 0.0)
    if noise is None:
        # Calibrate for the device that spends fastest: the fewest photos give the
        # highest Poisson rate 1/ceil(n/B).
        batches = math.ceil(cfg.data.photos_min / cfg.local.batch_size)
        steps = max(1, round(cfg.local.epochs * batches)) * planned_participations(cfg)
        noise = get_noise_multiplier(target_epsilon=float(target), target_delta=delta,
                                     sample_rate=1.0 / batches, steps=steps,
                                     accountant=p.accountant, epsilon_tolerance=0.005)
        budget = _limit(budget, float(target))
    return PhotoPlan(True, float(noise), float(p.max_grad_norm), delta, str(p.accountant),
                     budget, float(target) if p.noise_multiplier is None else None)


def user_plan(cfg: DictConfig) -> UserPlan:
    u, f = cfg.privacy.user, cfg.fleet
    if not u.enabled:
        return UserPlan(enabled=False)
    simulated = bool(u.simulated_population)
    population = int(u.simulated_population) if simulated else int(f.num_devices)
    cohort = int(u.simulated_cohort_size) if simulated else int(f.devices_per_round)
    delta = float(u.delta) if u.delta is not None else default_delta(population)

    def make(noise: float) -> UserMechanism:
        return UserMechanism(noise, float(u.clip), str(f.sampling), population, cohort, delta,
                             str(u.accountant), simulated)

    target = u.target_epsilon
    if u.noise_multiplier is None:
        mechanism = make(calibrate(make, float(target), int(f.rounds)))
        budget = _limit(float(u.budget_epsilon or 0.0), float(target))
    else:
        mechanism = make(float(u.noise_multiplier))
        budget = float(u.budget_epsilon or 0.0)
    return UserPlan(True, mechanism, budget,
                    float(target) if u.noise_multiplier is None else None, int(f.rounds))


def privacy_plan(cfg: DictConfig) -> PrivacyPlan:
    return PrivacyPlan(photo_plan(cfg), user_plan(cfg), str(cfg.privacy.noise))
