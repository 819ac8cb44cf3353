"""The release: how the server turns one round's device updates into the model it
publishes, and what that costs in privacy.

Everything the server does with updates is here, in the order a reviewer should
check it (Flower's ``dp_fixed_clipping`` and pfl-research's
``privacy_mechanism`` have the same shape: constrain sensitivity, then add noise):

1. **screen** each update against the weights the server sent: the same array
   keys, shapes and dtypes, and only finite values. A non-finite update is
   rejected *before* clipping (``min(1, C / nan)`` is 1, so a NaN would pass the
   clip unchanged) and counted as failed;
2. **publish** the shared weights of the round:
   * ``PlainRelease``: the configured Flower strategy aggregates (no user-level
     DP; photo-level DP, if on, was applied on the devices);
   * ``DpFedAvgRelease``: clip every update to C, sum with equal weights, add
     Gaussian noise, divide by a fixed k (``fl.privacy.dp_fedavg``), with noise
     from ``fl.privacy.noise`` (``privacy.noise``);
3. **count** the release (``released``), which is what the accountant composes;
4. **stop rule**: before a round, whether one more release would pass the budget.

Under secure aggregation (``aggregation.secure``, ``server.secure_aggregation``)
the server never holds an update, only the unmasked *sum* of the survivors'
updates, each clipped on its device to ``secure_clip()``; ``release_sum`` is that
path: screen the sum's keys and shapes, publish, count.

The round loop asks only these questions and never whether user-level DP is
on. Persisting each release before anything derived from it leaves the server
is the loop's job (``server.recorder``): a replayed round re-uses the persisted
release and never calls ``release`` twice for the same round.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fl import protocol as P
from fl.privacy import noise as N
from fl.privacy.dp_fedavg import dp_fedavg, noised_sum
from fl.privacy.plan import DEVICES, UserPlan
from fl.tracking import keys as K


@dataclass(frozen=True)
class DeviceUpdate:
    """One device's reply to a training round: its shared weights after training."""

    node: int
    arrays: dict[str, torch.Tensor]
    weight: float = 1.0  # examples the device claims (a weighted strategy's weight)
    message: Any = None  # the Flower reply: its metadata addresses the strategy's view


@dataclass(frozen=True)
class Released:
    """What one round published."""

    state: dict[str, torch.Tensor]  # the shared weights everyone may now see
    metrics: dict[str, float]  # privacy and aggregation metrics of the release
    accepted: list[int] = field(default_factory=list)  # nodes whose update counted
    rejected: dict[int, str] = field(default_factory=dict)  # node -> why not
    # Sampled devices never asked to train, through no fault of theirs (a secure
    # aggregation abandoned before training): neither failed nor rejected.
    excused: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SecureSum:
    """What secure aggregation hands the release instead of updates: the sum of the
    survivors' clipped updates (device-trained arrays minus the weights sent, each
    clipped to ``Release.secure_clip()`` on its device), and who is in it."""

    total: dict[str, torch.Tensor]  # float64, by array name
    count: int  # updates in the sum
    nodes: list[int] = field(default_factory=list)  # their devices
    # Under privacy.user.noise_at=devices: the noise multiplier the survivors' noise
    # in ``total`` delivers, sigma * sqrt(count / t) (0: no noise added on devices).
    noise_multiplier: float = 0.0


def screen_update(arrays: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                  weight: float = 1.0) -> str:
    """Why ``arrays`` cannot be aggregated with weights shaped like ``reference``
    ("" when it can). Reasons are short: they go into the ledger row and log."""
    if not (math.isfinite(weight) and weight > 0):
        return f"example count {weight!r} is not a positive finite number"
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        # Missing names are the server's own; extra ones are the device's words: a count.
        parts = ([f"missing arrays {missing[:3]}"] if missing else []) + (
            [f"{len(extra)} unexpected arrays"] if extra else [])
        return "; ".join(parts)
    for key, ref in reference.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
            return (f"array {key!r} is {value.dtype} {tuple(value.shape)}, expected "
                    f"{ref.dtype} {tuple(ref.shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"non-finite values in {key!r}"
    return ""


def screen(updates: list[DeviceUpdate], reference: dict[str, torch.Tensor]
           ) -> tuple[list[DeviceUpdate], dict[int, str]]:
    """(updates that may be aggregated, {node: reason} for those that may not)."""
    accepted, rejected = [], {}
    for update in updates:
        reason = screen_update(update.arrays, reference, update.weight)
        if reason:
            rejected[update.node] = f"update {reason}"
        else:
            accepted.append(update)
    return accepted, rejected


class Release(ABC):
    """One implementation per way of publishing a round (the contract test in
    tests/privacy/test_release.py runs every implementation)."""

    def __init__(self) -> None:
        self.released = 0  # rounds published so far (what the accountant composes)

    def release(self, rnd: int, shared: dict[str, torch.Tensor],
                updates: list[DeviceUpdate]) -> Released:
        """Screen, publish and count round ``rnd``. Never mutates ``shared``."""
        accepted, rejected = screen(updates, shared)
        state, metrics = self._publish(rnd, dict(shared), accepted)
        if not all(bool(torch.isfinite(v).all()) for v in state.values()
                   if v.is_floating_point()):
            raise RuntimeError(f"round {rnd}'s aggregate is not finite; nothing was released")
        self.released += 1
        return Released(state, metrics | self.metrics(), [u.node for u in accepted], rejected)

    def release_sum(self, rnd: int, shared: dict[str, torch.Tensor],
                    summed: SecureSum) -> Released:
        """Publish and count round ``rnd`` from a secure aggregate (never mutates
        ``shared``). The sum must cover exactly ``secure_keys(shared)``."""
        keys = self.secure_keys(shared)
        if sorted(summed.total) != sorted(keys) or summed.count < 1:
            raise ValueError(f"round {rnd}'s secure sum covers {sorted(summed.total)[:3]} "
                             f"of {summed.count} updates; expected the arrays {keys[:3]}")
        for key in keys:
            value = summed.total[key]
            if tuple(value.shape) != tuple(shared[key].shape) or \
                    not bool(torch.isfinite(value).all()):
                raise ValueError(f"round {rnd}'s secure sum of {key!r} is not finite and "
                                 f"shaped {tuple(shared[key].shape)}")
        state, metrics = self._publish_sum(rnd, dict(shared), summed)
        if not all(bool(torch.isfinite(v).all()) for v in state.values()
                   if v.is_floating_point()):
            raise RuntimeError(f"round {rnd}'s aggregate is not finite; nothing was released")
        self.released += 1
        return Released(state, metrics | self.metrics(), list(summed.nodes), {})

    @abstractmethod
    def secure_clip(self) -> float:
        """The L2 bound each device clips its update to before masking."""

    def secure_keys(self, shared: dict[str, torch.Tensor]) -> list[str]:
        """The arrays a secure aggregate sums (those devices train)."""
        return [k for k in shared if shared[k].is_floating_point()]

    def device_noise_multiplier(self) -> float:
        """sigma when each device adds its share of the user-level noise before
        masking (``privacy.user.noise_at=devices``); 0 when the server adds it."""
        return 0.0

    @abstractmethod
    def _publish_sum(self, rnd: int, shared: dict[str, torch.Tensor], summed: SecureSum
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """``_publish`` from the secure aggregate of updates the devices clipped."""

    @abstractmethod
    def _publish(self, rnd: int, shared: dict[str, torch.Tensor],
                 accepted: list[DeviceUpdate]) -> tuple[dict[str, torch.Tensor],
                                                        dict[str, float]]:
        """The round's published weights and metrics, from screened updates."""

    def metrics(self) -> dict[str, float]:
        """Privacy metrics after ``self.released`` releases."""
        return {}

    def stop_reason(self) -> str:
        """Why one more release must not happen ("" when it may)."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"released": self.released}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.released = int(state["released"])


class PlainRelease(Release):
    """The configured Flower strategy's aggregate (FedAvg by default): no
    user-level guarantee; a weighted mean has no per-user sensitivity bound.

    Without DP nothing else bounds one device's influence, so two optional
    bounds come first (``strategy.update_norm_bound``, ``strategy.max_examples``):
    each update is scaled down to an L2 norm of at most ``norm_bound`` around the
    weights sent, and each claimed example count is capped at ``max_examples``
    (1: equal weights). With both, one device moves a FedAvg mean by at most
    ``norm_bound * max_examples / total weight``; without them, a device claiming
    1e9 examples replaces the model.
    """

    def __init__(self, strategy, norm_bound: float = 0.0, max_examples: int = 0,
                 is_device_trained: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self.strategy, self.norm_bound, self.max_examples = strategy, norm_bound, max_examples
        self.is_device_trained = is_device_trained

    def secure_clip(self) -> float:
        return float(self.norm_bound)

    def secure_keys(self, shared):
        trained = self.is_device_trained or (lambda key: True)
        return [k for k in shared if shared[k].is_floating_point() and trained(k)]

    def _publish_sum(self, rnd, shared, summed):
        """Secure aggregation without user-level DP: the equal-weight mean of the
        norm-bounded updates (FedAvg with ``strategy.max_examples=1``; the strategy
        sees no individual update to weight)."""
        for key, value in summed.total.items():
            mean = value.to(torch.float64) / summed.count
            shared[key] = (shared[key].to(torch.float64) + mean).to(shared[key].dtype)
        return shared, {}

    def _bounded(self, update: DeviceUpdate, shared: dict[str, torch.Tensor]) -> DeviceUpdate:
        arrays, weight = update.arrays, update.weight
        if self.norm_bound > 0:
            delta = {k: arrays[k].double() - shared[k].double() for k in shared
                     if shared[k].is_floating_point()}
            norm = float(torch.sqrt(sum((d * d).sum() for d in delta.values())))
            if norm > self.norm_bound:
                factor = self.norm_bound / norm
                arrays = dict(arrays) | {k: (shared[k].double() + d * factor).to(shared[k].dtype)
                                         for k, d in delta.items()}
        if self.max_examples > 0:
            weight = min(weight, float(self.max_examples))
        return DeviceUpdate(update.node, arrays, weight, update.message)

    def _publish(self, rnd, shared, accepted):
        if accepted:
            bounded = [self._bounded(u, shared) for u in accepted]
            aggregated, _ = self.strategy.aggregate_train(rnd, [_screened(u) for u in bounded])
            if aggregated is not None:
                shared.update(aggregated.to_torch_state_dict())
        return shared, {}


def _screened(update: DeviceUpdate) -> Message:
    """The reply as the strategy sees it: only the screened arrays and weight,
    never records or metrics the device added (Flower's strategies read every
    record of a reply and refuse replies whose records differ)."""
    content = RecordDict({P.ARRAYS: ArrayRecord(update.arrays),
                          P.METRICS: MetricRecord({P.WEIGHT_KEY: float(update.weight)})})
    return Message(metadata=update.message.metadata, content=content)


def user_epsilons(plan: UserPlan, released: int) -> dict[str, float]:
    """User-level epsilon of ``released`` aggregates, as MLflow metrics.

    A simulated cohort is reported under its own ``simulated_*`` keys and,
    separately, the real run's guarantee (``UserPlan.real_mechanism``).
    """
    m, real = plan.mechanism, plan.real_mechanism
    out = {K.USER_EPS: real.epsilon(released), K.USER_DELTA: real.delta,
           K.USER_NOISE_MULTIPLIER: real.noise_multiplier}
    if m.simulated:
        out |= {K.SIM_USER_EPS: m.epsilon(released), K.SIM_USER_DELTA: m.delta,
                K.SIM_USER_NOISE_MULTIPLIER: m.noise_multiplier}
    return out


class DpFedAvgRelease(Release):
    """User-level DP: DP-FedAvg over the device-trained shared weights.

    The published quantity is ``shared + (sum_i clip_C(u_i) + N(0, (sigma C s)^2)) / k``
    with k = ``fleet.devices_per_round`` (a fixed, public divisor) and s = 1, or
    k / K for a simulated cohort of K. Neighbouring relation: add/remove one user
    (Poisson sampling) or replace one user (fixed-size), as ``UserMechanism``
    states; the noise is added even when nobody answered, so the release does not
    depend on who did beyond the clipped sum.
    """

    def __init__(self, plan: UserPlan, is_device_trained: Callable[[str], bool],
                 noise_mode: str, seed: int) -> None:
        super().__init__()
        self.plan, self.mechanism = plan, plan.mechanism
        self.budget = float(plan.budget_epsilon or 0.0)
        self.is_device_trained = is_device_trained
        self.k = int(plan.fleet_cohort)  # the fixed, public divisor
        self.noise_mode, self.seed = N.check_mode(noise_mode), int(seed)
        if plan.noise_at == DEVICES and plan.simulated:
            raise ValueError("privacy.user.noise_at=devices cannot simulate a cohort")

    def _publish(self, rnd, shared, accepted):
        if self.plan.noise_at == DEVICES:
            raise ValueError("privacy.user.noise_at=devices releases only from a secure "
                             "aggregate (aggregation.secure=true)")
        m = self.mechanism
        keys = [k for k in shared if self.is_device_trained(k)]
        aggregate = dp_fedavg(
            shared, [u.arrays for u in accepted], keys, clip=m.clip,
            noise_multiplier=m.noise_multiplier, denominator=self.k,
            generator=N.generator(self.noise_mode, self.seed, rnd),
            noise_scale=self.k / m.cohort, noise_mode=self.noise_mode)
        return aggregate.state, {K.UPDATE_CLIP_FRACTION: aggregate.clip_fraction}

    def secure_clip(self) -> float:
        return float(self.mechanism.clip)

    def secure_keys(self, shared):
        return [k for k in shared if self.is_device_trained(k)]

    def device_noise_multiplier(self) -> float:
        return float(self.mechanism.noise_multiplier) if self.plan.noise_at == DEVICES else 0.0

    def _publish_sum(self, rnd, shared, summed):
        """The same release as ``_publish`` from the sum of updates each device
        clipped to C: the same noise, the same fixed divisor. No clip fraction: the
        server sees no individual norm. Under ``noise_at=devices`` the noise is
        already in the sum (the survivors'); it must deliver at least the accounted
        sigma, or nothing is released."""
        m = self.mechanism
        keys = self.secure_keys(shared)
        if self.plan.noise_at == DEVICES:
            if summed.noise_multiplier < m.noise_multiplier * (1 - 1e-9):
                raise ValueError(f"round {rnd}'s sum carries noise of multiplier "
                                 f"{summed.noise_multiplier:.4g}, below the accounted "
                                 f"{m.noise_multiplier:.4g}; nothing was released")
            state = dict(shared)
            for k in keys:
                mean = summed.total[k].to(torch.float64) / self.k
                state[k] = (shared[k].to(torch.float64) + mean).to(shared[k].dtype)
            return state, {K.USER_NOISE_DELIVERED: summed.noise_multiplier}
        state = noised_sum(shared, summed.total, keys, clip=m.clip,
                           noise_multiplier=m.noise_multiplier, denominator=self.k,
                           generator=N.generator(self.noise_mode, self.seed, rnd),
                           noise_mode=self.noise_mode, noise_scale=self.k / m.cohort)
        return state, {}

    def metrics(self) -> dict[str, float]:
        return user_epsilons(self.plan, self.released)

    def stop_reason(self) -> str:
        """The budget limits the accounted mechanism (the simulated one, in a
        simulated cohort: the privacy report says so)."""
        if self.budget <= 0:
            return ""
        after = self.mechanism.epsilon(self.released + 1)
        if after <= self.budget:
            return ""
        what = "simulated user-level epsilon" if self.mechanism.simulated else \
            "user-level epsilon"
        return f"one more round would take {what} to {after:.3f}, past the budget {self.budget:g}"


def make_release(user: UserPlan, strategy, is_device_trained: Callable[[str], bool],
                 noise_mode: str, seed: int, norm_bound: float = 0.0,
                 max_examples: int = 0) -> Release:
    """The release the privacy plan asks for (DP-FedAvg's clip is its own bound)."""
    if user.enabled:
        return DpFedAvgRelease(user, is_device_trained, noise_mode, seed)
    return PlainRelease(strategy, norm_bound, max_examples, is_device_trained)
