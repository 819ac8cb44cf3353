"""The federated round loop: sample devices, train, aggregate, evaluate, log.

fedface drives the rounds itself instead of calling ``Strategy.start`` because
it must own *which* devices take part: sampling is seeded (reproducible runs),
devices whose privacy budget is spent are no longer sampled, and the privacy
accounting must match the sampling scheme actually used. A Flower strategy
(FedAvg by default, any ``flwr.serverapp.strategy`` class by config) still builds
the messages and aggregates the replies; it is handed a view of the grid that
contains exactly the devices fedface sampled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl import protocol as P
from fl.data.fleet import FleetSpec
from fl.privacy.dp_fedavg import dp_fedavg
from fl.privacy.plan import PhotoPlan, UserPlan, default_delta
from fl.privacy.user_level import UserMechanism
from fl.tasks.base import Task
from fl.tracking import keys as K
from server.checkpoint import LoopState, restore_strategy, strategy_state
from server.newuser import newuser_score
from server.progress import Progress
from server.roll_call import roll_call, wait_for_nodes

PULL_INTERVAL = 0.25  # seconds between polls for device replies


class SampledGrid:
    """A grid whose node list is the devices fedface sampled for this step."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid, self._node_ids = grid, [int(n) for n in node_ids]

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@dataclass
class LoopSettings:
    rounds: int
    devices_per_round: int
    sampling: str  # "fixed" | "poisson"
    eval_devices: int
    num_devices: int
    newuser_every: int
    newuser_identities: int
    newuser_steps: int
    round_timeout: float
    seed: int
    photo: PhotoPlan
    user: UserPlan


@dataclass
class DeviceRecord:
    """What the server knows of one device's photo-level ledger (from its replies)."""

    device: str  # pseudonym: "device-<index>", never a path or a person's name
    participations: int = 0
    steps: int = 0
    sample_rate: float = 0.0
    epsilon: float | None = None  # photo-level, as last reported; None: never reported
    status: str = "never sampled"  # | trained | budget exhausted | failed | not trained: why
    # Consent and data, as last reported (counts only).
    photos_withdrawn: int = 0
    photos_skipped: int = 0
    photos_converted: int = 0
    opted_out: bool = False  # deleted its data, or no photo consented for training
    deleted: bool = False  # the user deleted their data: never sampled again
    excluded: bool = False  # too few usable photos: never sampled again

    @property
    def gone(self) -> bool:
        return self.deleted or self.excluded

    def note(self, m, reason: str) -> None:
        """Fold a reply's consent and data report into the record."""
        self.photos_withdrawn = int(m.get(P.PHOTOS_WITHDRAWN, self.photos_withdrawn))
        self.photos_skipped = int(m.get(P.PHOTOS_SKIPPED, self.photos_skipped))
        self.photos_converted = int(m.get(P.PHOTOS_CONVERTED, self.photos_converted))
        self.opted_out = bool(m.get(P.OPTED_OUT, 0))
        self.deleted = self.deleted or bool(m.get(P.DELETED, 0))
        self.excluded = self.excluded or bool(m.get(P.EXCLUDED, 0))
        if reason:
            self.status = f"not trained: {reason}"


@dataclass
class LoopResult:
    shared: dict[str, torch.Tensor]
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    devices: dict[int, DeviceRecord] = field(default_factory=dict)  # by node id
    user_rounds: int = 0  # aggregates released under user-level DP
    stopped: str = ""  # why the run ended early, if it did


def user_epsilons(m: UserMechanism, devices_per_round: int, num_devices: int,
                  released: int) -> dict[str, float]:
    """User-level epsilon of ``released`` aggregates, as MLflow metrics.

    A simulated cohort is reported under its own ``simulated_*`` keys and,
    separately, the real run's guarantee: the real cohort of k devices got noise
    std sigma*C*k/K, i.e. a noise multiplier of sigma*k/K over the real fleet.
    """
    if not m.simulated:
        return {K.USER_EPS: m.epsilon(released), K.USER_DELTA: m.delta,
                K.USER_NOISE_MULTIPLIER: m.noise_multiplier}
    real = UserMechanism(m.noise_multiplier * devices_per_round / m.cohort, m.clip, m.sampling,
                         num_devices, devices_per_round, default_delta(num_devices),
                         m.accountant)
    return {K.SIM_USER_EPS: m.epsilon(released), K.SIM_USER_DELTA: m.delta,
            K.SIM_USER_NOISE_MULTIPLIER: m.noise_multiplier,
            K.USER_EPS: real.epsilon(released), K.USER_DELTA: real.delta,
            K.USER_NOISE_MULTIPLIER: real.noise_multiplier}


def _reason(reply: Message) -> str:
    """Why a device took no part, as it said (a short sentence, never photo ids)."""
    return str(reply.content[P.STATUS][P.REASON]) if P.STATUS in reply.content else ""


def _fleet_consent(records) -> dict[str, float]:
    """Consent and data metrics over everything devices have reported so far."""
    records = list(records)
    return {
        K.CONSENT_PHOTOS_REVOKED: float(sum(r.photos_withdrawn for r in records)),
        K.CONSENT_DEVICES_OPTED_OUT: float(sum(r.opted_out for r in records)),
        K.DATA_PHOTOS_SKIPPED: float(sum(r.photos_skipped for r in records)),
        K.DATA_PHOTOS_CONVERTED: float(sum(r.photos_converted for r in records)),
        K.DATA_DEVICES_EXCLUDED: float(sum(r.excluded for r in records)),
    }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


class RoundLoop:
    """Runs the rounds; after each, hands ``on_round`` the metrics and the loop's
    state (what a checkpoint needs to continue from there)."""

    def __init__(self, grid: Grid, strategy: Strategy, task: Task, spec: FleetSpec,
                 settings: LoopSettings, round_config: ConfigRecord,
                 personal_init: dict[str, torch.Tensor],
                 on_round: Callable[[int, dict[str, float], LoopState], None],
                 progress: Progress | None = None) -> None:
        self.grid, self.strategy, self.task, self.spec = grid, strategy, task, spec
        self.s = settings
        self.config = round_config
        self.personal_init = personal_init
        self.personal_record = ArrayRecord(personal_init)
        self.on_round = on_round
        self.progress = progress or Progress(settings.rounds)
        self.rng = np.random.default_rng(settings.seed)

    def _sample(self, nodes: list[int], k: int) -> list[int]:
        """k distinct nodes, uniformly. Indices, not ids, go through numpy: Flower
        node ids are unsigned 64-bit and would not survive an int64 array."""
        return [nodes[i] for i in self.rng.choice(len(nodes), k, replace=False)]

    def _sample_cohort(self, eligible: list[int]) -> list[int]:
        """This round's devices, by the scheme the user-level accountant assumes.

        Poisson: every eligible device joins independently with q = k/N, N the
        whole fleet (so q per user never exceeds the accounted rate). Fixed:
        exactly k eligible devices, uniformly without replacement.
        """
        if self.s.sampling == "poisson":
            q = self.s.devices_per_round / self.s.num_devices
            return [n for n, u in zip(eligible, self.rng.random(len(eligible))) if u < q]
        return self._sample(eligible, min(self.s.devices_per_round, len(eligible)))

    def _send(self, messages: Iterable[Message], step: str) -> list[Message]:
        """Push the messages, then pull replies until all came or the timeout
        passed (devices that never answer are counted as failed), reporting each
        device as it finishes."""
        messages = list(messages)
        for message in messages:
            message.content[P.PERSONAL_INIT] = self.personal_record
        waiting = set(self.grid.push_messages(messages))
        total, replies = len(waiting), []
        deadline = time.time() + self.s.round_timeout
        while waiting and time.time() < deadline:
            got = list(self.grid.pull_messages(waiting))
            replies += got
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            if got:
                self.progress.devices(step, len(replies), total)
            if waiting:
                time.sleep(PULL_INTERVAL)
        return replies

    def run(self, shared: dict[str, torch.Tensor], resume: LoopState | None = None) -> LoopResult:
        """Round 0 (evaluation before fine-tuning) and rounds 1..R, or, from a
        checkpoint's ``resume`` state, the rounds after the last completed one."""
        index = roll_call(self.grid, wait_for_nodes(self.grid, self.s.num_devices),
                          self.s.round_timeout)
        nodes = list(index)
        result = LoopResult(shared=dict(shared), devices={
            node: DeviceRecord(f"device-{i:05d}") for node, i in index.items()})
        if resume is None:
            panel = sorted(self._sample(nodes, self.s.eval_devices))
            exhausted: set[int] = set()
            metrics = self._evaluate(0, result.shared, panel)
            metrics.update(self._newuser(result.shared))
            result.history[0] = metrics
            self.on_round(0, metrics, self._state(0, result, panel, exhausted, index))
            first = 1
        else:
            panel, exhausted = self._restore(resume, result, index)
            first = resume.round + 1
        self.progress.begin(first)

        for rnd in range(first, self.s.rounds + 1):
            start = time.time()
            eligible = [n for n in nodes if n not in exhausted and not result.devices[n].gone]
            result.stopped = self._stop_reason(result, eligible)
            if result.stopped:
                break
            sampled = self._sample_cohort(eligible)
            self.progress.round_started(rnd, len(sampled))
            replies = []
            if sampled:  # Poisson sampling may pick nobody; a strategy would wait for nodes
                replies = self._send(self.strategy.configure_train(
                    rnd, ArrayRecord(result.shared), ConfigRecord(dict(self.config)),
                    SampledGrid(self.grid, sampled)), "trained")
            train_seconds = time.time() - start
            metrics = self._collect_train(rnd, len(sampled), replies, result, exhausted)
            metrics.update(self._evaluate(rnd, result.shared, panel))
            if rnd % max(self.s.newuser_every, 1) == 0 or rnd == self.s.rounds:
                metrics.update(self._newuser(result.shared))
            metrics[K.ROUND_SECONDS] = time.time() - start
            metrics[K.UPDATES_PER_SECOND] = metrics[K.DEVICES_TRAINED] / max(train_seconds, 1e-9)
            result.history[rnd] = metrics
            self.progress.round_finished()
            self.on_round(rnd, metrics, self._state(rnd, result, panel, exhausted, index))
        return result

    def _state(self, rnd: int, result: LoopResult, panel: list[int], exhausted: set[int],
               index: dict[int, int]) -> LoopState:
        return LoopState(
            round=rnd, shared=result.shared, history=result.history,
            devices={index[node]: asdict(record) for node, record in result.devices.items()},
            exhausted=sorted(index[n] for n in exhausted), panel=[index[n] for n in panel],
            user_rounds=result.user_rounds, rng=self.rng.bit_generator.state,
            strategy=strategy_state(self.strategy))

    def _restore(self, state: LoopState, result: LoopResult,
                 index: dict[int, int]) -> tuple[list[int], set[int]]:
        """Put the loop back where ``state`` left it; this session's node ids
        replace the old session's through the devices' stable indices."""
        node_of = {device: node for node, device in index.items()}
        unknown = sorted(set(state.devices) - set(node_of))
        if unknown:
            raise RuntimeError(f"the checkpoint has devices {unknown[:5]} that are not in this "
                               "fleet; resume with the same fleet the run started with")
        result.shared = dict(state.shared)
        result.history = {int(r): dict(m) for r, m in state.history.items()}
        result.devices = {node_of[d]: DeviceRecord(**fields) for d, fields in state.devices.items()}
        result.user_rounds = int(state.user_rounds)
        self.rng.bit_generator.state = state.rng
        restore_strategy(self.strategy, state.strategy)
        return [node_of[d] for d in state.panel], {node_of[d] for d in state.exhausted}

    def _stop_reason(self, result: LoopResult, eligible: list[int]) -> str:
        """Why the next round must not run: no device may train, or releasing one
        more aggregate would pass the fleet's user-level budget."""
        if not eligible:
            return ("no device can train: every device has spent its photo-level budget, "
                    "deleted its data or was excluded")
        user = self.s.user
        if user.enabled and user.budget_epsilon > 0:
            after = user.mechanism.epsilon(result.user_rounds + 1)
            if after > user.budget_epsilon:
                return (f"one more round would take user-level epsilon to {after:.3f}, past "
                        f"the budget {user.budget_epsilon:g}")
        return ""

    def _aggregate(self, rnd: int, trained: list[Message], result: LoopResult,
                   metrics: dict[str, float]) -> None:
        """Fold the round's updates into the shared weights.

        Without user-level DP the configured Flower strategy aggregates. With it,
        DP-FedAvg releases a noised, equally weighted mean of clipped updates of
        the device-trained weights (even when no device trained: the noise, and
        its accounting, do not depend on who answered).
        """
        user = self.s.user
        if not user.enabled:
            if trained:
                aggregated, _ = self.strategy.aggregate_train(rnd, trained)
                if aggregated is not None:
                    result.shared.update(aggregated.to_torch_state_dict())
            return
        m = user.mechanism
        keys = [k for k in result.shared if self.task.is_device_trained(k)]
        generator = torch.Generator().manual_seed(hash((self.s.seed, rnd)) % 2**63)
        aggregate = dp_fedavg(
            result.shared, [r.content[P.ARRAYS].to_torch_state_dict() for r in trained], keys,
            clip=m.clip, noise_multiplier=m.noise_multiplier,
            denominator=self.s.devices_per_round, generator=generator,
            noise_scale=self.s.devices_per_round / m.cohort)
        result.shared = aggregate.state
        result.user_rounds += 1
        metrics[K.UPDATE_CLIP_FRACTION] = aggregate.clip_fraction
        metrics.update(user_epsilons(user.mechanism, self.s.devices_per_round,
                                     self.s.num_devices, result.user_rounds))

    def _collect_train(self, rnd: int, num_sampled: int, replies: list[Message],
                       result: LoopResult, exhausted: set[int]) -> dict[str, float]:
        ok = [r for r in replies if not r.has_error()]
        trained = [r for r in ok if P.ARRAYS in r.content]
        for reply in replies:
            if reply.has_error() and reply.metadata.src_node_id in result.devices:
                result.devices[reply.metadata.src_node_id].status = "failed"
        losses, photos_used = [], 0
        for reply in ok:
            node = reply.metadata.src_node_id
            m = reply.content[P.METRICS]
            record = result.devices[node]
            record.participations = int(m[P.PARTICIPATIONS])
            record.steps = int(m[P.LEDGER_STEPS])
            record.sample_rate = float(m[P.SAMPLE_RATE]) or record.sample_rate
            record.epsilon = float(m[P.PHOTO_EPS])
            record.status = "trained"
            record.note(m, _reason(reply))
            if int(m[P.BUDGET_EXHAUSTED]):
                exhausted.add(node)
                record.status = "budget exhausted"
            if int(m[P.TRAINED]):
                losses.append(float(m[P.TRAIN_LOSS]))
                photos_used += int(m[P.PHOTOS_USED])
        metrics = {
            K.TRAIN_LOSS: _mean(losses),
            K.DEVICES_SAMPLED: float(num_sampled),
            K.DEVICES_TRAINED: float(len(trained)),
            # Errors and devices that never answered (timeouts) alike.
            K.DEVICES_FAILED: float(num_sampled - len(ok)),
            K.DEVICES_BUDGET_EXHAUSTED: float(len(exhausted)),
            K.CONSENT_PHOTOS_USED: float(photos_used),
        } | _fleet_consent(result.devices.values())
        if self.s.photo.enabled:
            eps = [r.epsilon for r in result.devices.values()
                   if r.epsilon is not None] or [0.0]
            metrics[K.PHOTO_EPS_MAX] = float(np.max(eps))
            metrics[K.PHOTO_EPS_MEAN] = float(np.mean(eps))
            metrics[K.PHOTO_EPS_P95] = float(np.percentile(eps, 95))
            metrics[K.PHOTO_DELTA] = self.s.photo.delta
        self._aggregate(rnd, trained, result, metrics)
        return metrics

    def _evaluate(self, rnd: int, shared: dict[str, torch.Tensor],
                  panel: list[int]) -> dict[str, float]:
        if not panel:
            return {}
        replies = self._send(self.strategy.configure_evaluate(
            rnd, ArrayRecord(shared), ConfigRecord(dict(self.config)),
            SampledGrid(self.grid, panel)), "evaluated")
        ok = [r.content[P.METRICS] for r in replies if not r.has_error()]
        out = {key: _mean([float(m[name]) for m in ok if name in m])
               for name, key in K.QUALITY.items() if any(name in m for m in ok)}
        out[K.DEVICES_EVALUATED_PERSONALISED] = float(sum(int(m[P.PERSONALISED]) for m in ok))
        return out

    def _newuser(self, shared: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.s.newuser_identities <= 0:
            return {}
        score = newuser_score(self.task, shared, self.personal_init, self.spec,
                              self.s.newuser_identities, self.s.newuser_steps, self.s.seed)
        return {K.NEWUSER[self.task.primary_metric]: score}
