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

from fl.privacy.steps import opacus_batches, steps_per_participation
from fl.privacy.user_level import UserMechanism, calibrate

# privacy.user.noise_at: who adds the user-level Gaussian noise. ``server``: to the
# (unmasked) sum; ``devices``: each device its share before masking (needs
# aggregation.secure; fl.secagg.noise).
NOISE_AT = ("server", "devices")
SERVER, DEVICES = NOISE_AT


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
    """The user-level plan. Under a simulated cohort, ``mechanism``,
    ``budget_epsilon`` and ``target_epsilon`` describe the SIMULATED deployment
    (the server's stop rule uses them); ``real_mechanism`` is what the real fleet
    of ``fleet_population`` devices, ``fleet_cohort`` a round, actually got."""

    enabled: bool
    mechanism: UserMechanism | None = None
    budget_epsilon: float = 0.0
    target_epsilon: float | None = None
    rounds: int = 0
    fleet_population: int = 0  # N: fleet.num_devices
    fleet_cohort: int = 0  # k: fleet.devices_per_round
    noise_at: str = "server"  # privacy.user.noise_at: server | devices (NOISE_AT)

    @property
    def simulated(self) -> bool:
        return bool(self.mechanism and self.mechanism.simulated)

    @property
    def real_mechanism(self) -> UserMechanism | None:
        """The real run's mechanism, whatever is simulated.

        A simulated cohort of K adds noise std sigma*C*k/K to the real sum of k
        updates: a noise multiplier of sigma*k/K over the real fleet of N, at the
        default delta 0.1/N (what ``fl.privacy.release`` reports as the real epsilon). No
        budget or target applies to it; they limit the simulation.
        """
        m = self.mechanism
        if m is None or not m.simulated:
            return m
        return UserMechanism(m.noise_multiplier * self.fleet_cohort / m.cohort, m.clip,
                             m.sampling, self.fleet_population, self.fleet_cohort,
                             default_delta(self.fleet_population), m.accountant)


def _user_params(user: UserPlan) -> dict[str, str]:
    """``privacy.plan.user_*`` always describe the real run; a simulated cohort's
    values (and the budget and target that limit only the simulation) go under
    ``privacy.plan.simulated_user_*``, so no simulated value hides under a real name."""
    real, planned = user.real_mechanism, user.mechanism
    out = {"privacy.plan.user_simulated": str(user.simulated),
           "privacy.plan.user_noise_multiplier": f"{real.noise_multiplier:.6g}",
           "privacy.plan.user_delta": f"{real.delta:.6g}",
           "privacy.plan.user_sampling": real.sampling,
           "privacy.plan.user_population": str(real.population),
           "privacy.plan.user_cohort": str(real.cohort)}
    limits = {"budget_epsilon": f"{user.budget_epsilon:.6g}",
              "noise_calibrated": str(user.target_epsilon is not None)}
    if not user.simulated:
        return out | {f"privacy.plan.user_{k}": v for k, v in limits.items()}
    simulated = {"noise_multiplier": f"{planned.noise_multiplier:.6g}",
                 "delta": f"{planned.delta:.6g}", "population": str(planned.population),
                 "cohort": str(planned.cohort)} | limits
    return out | {f"privacy.plan.simulated_user_{k}": v for k, v in simulated.items()}


@dataclass(frozen=True)
class PrivacyPlan:
    photo: PhotoPlan
    user: UserPlan
    noise: str = "seeded"  # privacy.noise (fl.privacy.noise): "secure" | "seeded"

    def params(self) -> dict[str, str]:
        """MLflow params of the resolved plan (simulated values under their own names)."""
        out = {"privacy.plan.photo_enabled": str(self.photo.enabled),
               "privacy.plan.user_enabled": str(self.user.enabled)}
        if self.photo.enabled:
            out.update({"privacy.plan.photo_noise_multiplier": f"{self.photo.noise_multiplier:.6g}",
                        "privacy.plan.photo_delta": f"{self.photo.delta:.6g}",
                        "privacy.plan.photo_budget_epsilon": f"{self.photo.budget_epsilon:.6g}",
                        "privacy.plan.photo_noise_calibrated": str(
                            self.photo.target_epsilon is not None)})
        if self.user.enabled:
            out.update(_user_params(self.user))
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
        # highest Poisson rate.
        batches = opacus_batches(cfg.data.photos_min, cfg.local.batch_size)
        per_participation = steps_per_participation(
            float(cfg.local.epochs), float(cfg.local.get("personal_epochs", 0.0)), batches,
            trains_shared=bool(cfg.task.get("device_trains", True)))
        steps = per_participation * planned_participations(cfg)
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
                    float(target) if u.noise_multiplier is None else None, int(f.rounds),
                    int(f.num_devices), int(f.devices_per_round),
                    str(u.get("noise_at", SERVER)))


def privacy_plan(cfg: DictConfig) -> PrivacyPlan:
    return PrivacyPlan(photo_plan(cfg), user_plan(cfg), str(cfg.privacy.noise))
