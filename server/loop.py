"""The federated round loop: a numbered recipe over modules that each do one thing.

fedface drives the rounds itself instead of calling ``Strategy.start`` because
it must own *which* devices take part (seeded sampling that matches the privacy
accounting, devices whose budget is spent no longer asked) and *what* is
released. A Flower strategy (FedAvg by default, any ``flwr.serverapp.strategy``
class by config) still builds the messages, and aggregates when no user-level DP
is on. Each round:

1. stop if no device can train or one more release would pass the budget
   (``fl.privacy.release``);
2. sample the cohort from the whole fleet (``server.sampling``);
3. send the training recipe, collect replies (``server.transport``);
4. validate the replies and fold them into the device records: the typed
   reply, rejections, failures, availability (``server.records``);
5. screen, aggregate, noise and count: the release (``fl.privacy.release``);
6. persist the release before anything derived from it leaves the server
   (``recorder.released``): a replay of this round re-uses it;
7. evaluate the released model on the fixed panel, the new-user check;
8. checkpoint and log the round (``recorder.round_done``).

Everything inside the loop is keyed by the device's stable index (0..N-1);
Flower node ids appear only where messages go out and replies come in. A device
absent from this session (it missed the roll call) keeps its index, record and
place in the sampling: drawn, it simply sits the round out.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl.config import ConfigError
from fl.console import say
from fl.data.fleet import FleetSpec
from fl.privacy.noise import SEEDED
from fl.privacy.plan import PhotoPlan
from fl.privacy.release import Release
from fl.tasks.base import Task
from fl.tracking import keys as K
from server.aggregation import make_aggregation
from server.checkpoint import DONE, RELEASED, LoopState, restore_strategy, strategy_state
from server.newuser import newuser_score
from server.progress import Progress
from server.records import (
    DeviceRecord,
    DeviceRecords,
    Eligible,
    fleet_consent,
    fold_evaluate_replies,
    fold_train_reports,
    mean,
    newer_state,
    note_availability,
    parse_train_replies,
    photo_metrics,
)
from server.roll_call import ROLL_CALL_TIMEOUT, learn_indices, quorum
from server.sampling import CohortSampler
from server.transport import SampledGrid, Transport


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
    noise: str = SEEDED  # privacy.noise: also decides where the sampling seed comes from
    start_quorum: float = 1.0  # share of the fleet that must answer the roll call
    unavailable_after: int = 0  # misses in a row that pause a device (0: never)
    retry_after: int = 1  # rounds a paused device is not sampled
    max_examples: float = float("inf")  # most training photos a device can hold
    secure: bool = False  # aggregation.secure: SecAgg+, the server sees only the sum
    num_shares: float = 1.0  # aggregation.num_shares
    threshold: float = 0.75  # aggregation.threshold
    min_survivors: int = 3  # aggregation.min_survivors
    device: str = "cpu"  # the `device` key: where the new-user check computes


@dataclass
class LoopResult:
    shared: dict[str, torch.Tensor]
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    # by device index; only devices that took part have one (server.records)
    devices: dict[int, DeviceRecord] = field(default_factory=lambda: DeviceRecords())
    stopped: str = ""  # why the run ended early, if it did


class Recorder(Protocol):
    """What happens to a round's results (``server.recorder.RoundRecorder``)."""

    def released(self, rnd: int, state: LoopState) -> None: ...

    def round_done(self, rnd: int, metrics: dict[str, float], state: LoopState) -> None: ...


class StaleCheckpoint(ConfigError):
    """The server resumed from a checkpoint older than the devices' own state."""


class RoundLoop:
    def __init__(self, grid: Grid, strategy: Strategy, release: Release, task: Task,
                 spec: FleetSpec, settings: LoopSettings, round_config: ConfigRecord,
                 personal_init: dict[str, torch.Tensor], recorder: Recorder,
                 progress: Progress | None = None, log: Callable[[str], None] = say) -> None:
        self.grid, self.strategy, self.release, self.task = grid, strategy, release, task
        self.log = log
        self.spec, self.s, self.config = spec, settings, round_config
        self.personal_init = personal_init
        self.recorder = recorder
        self.progress = progress or Progress(settings.rounds)
        # Under secure noise the cohorts are secret too (sampling amplification
        # assumes it): the generator is seeded from the OS and its state is never
        # checkpointed (PCG64 can be stepped backwards to past cohorts); a resume
        # draws the rounds not yet released from a fresh OS seed.
        self.secret_sampling = settings.noise != SEEDED
        sampling_seed = secrets.randbits(64) if self.secret_sampling else settings.seed
        self.sampler = CohortSampler(settings.sampling, settings.devices_per_round,
                                     settings.num_devices, sampling_seed)
        self.transport = Transport(grid, ArrayRecord(personal_init), settings.round_timeout,
                                   self.progress.devices, first_timeout=ROLL_CALL_TIMEOUT)
        # Steps 3 and 5, plain or secure (SecAgg+): the one place that chooses.
        self.aggregation = make_aggregation(settings.secure, self.transport, release,
                                            settings.num_shares, settings.threshold, log,
                                            settings.min_survivors)

    def run(self, shared: dict[str, torch.Tensor], resume: LoopState | None = None) -> LoopResult:
        """Round 0 (evaluation before fine-tuning) and rounds 1..R, or, from a
        checkpoint's ``resume`` state, the rest of the run."""
        n = self.s.num_devices
        needed = quorum(n, self.s.start_quorum)
        call = learn_indices(self.grid, n, needed, max(self.s.round_timeout, ROLL_CALL_TIMEOUT),
                             self.log)  # from the simulation engine, or a roll call
        self.index = call.index  # node id -> device index, this session only
        self.node_of = {device: node for node, device in call.index.items()}
        result = LoopResult(shared=dict(shared))
        self.resumed = resume is not None
        if resume is None:
            panel, exhausted = self._panel(), set()
            metrics = self._evaluate(0, result.shared, panel) | self._newuser(result.shared)
            result.history[0] = metrics
            self.recorder.round_done(0, metrics, self._state(0, DONE, result, panel, exhausted))
            first, released_already = 1, None
        else:
            panel, exhausted = self._restore(resume, result)
            released_already = resume.round if resume.phase == RELEASED else None
            first = resume.round + (released_already is None)
        self.progress.begin(first)

        for rnd in range(first, self.s.rounds + 1):
            start = time.time()
            if rnd == released_already:  # 6. persisted before the stop: never redrawn
                metrics = dict(result.history[rnd])
            else:
                eligible = Eligible(self.node_of, result.devices, exhausted, rnd)
                result.stopped = self._stop_reason(eligible, result, exhausted)  # 1.
                if result.stopped:
                    break
                metrics = self._train_and_release(rnd, eligible, result, exhausted)
                metrics[K.ROUND_SECONDS] = time.time() - start  # so far; evaluation adds
                result.history[rnd] = dict(metrics)
                self.recorder.released(rnd, self._state(rnd, RELEASED, result, panel, exhausted))
            evaluated_from = time.time()
            metrics.update(self._evaluate(rnd, result.shared, panel))  # 7.
            if rnd % max(self.s.newuser_every, 1) == 0 or rnd == self.s.rounds:
                metrics.update(self._newuser(result.shared))
            metrics[K.ROUND_SECONDS] = (metrics.get(K.ROUND_SECONDS, 0.0)
                                        + time.time() - evaluated_from)
            result.history[rnd] = metrics
            self.progress.round_finished()
            self.recorder.round_done(rnd, metrics,  # 8.
                                     self._state(rnd, DONE, result, panel, exhausted))
        return result

    def _panel(self) -> list[int]:
        """The fixed evaluation panel (device indices), always from the run's seed:
        the same users in every run of a fleet, whatever the noise mode, so runs
        compare on the same people (evaluation metrics are released without DP
        either way). Under seeded noise it is the cohort sampler's first draw."""
        sampler = self.sampler if not self.secret_sampling else CohortSampler(
            self.s.sampling, self.s.devices_per_round, self.s.num_devices, self.s.seed)
        return sorted(sampler.choose(list(range(self.s.num_devices)), self.s.eval_devices))

    def _stop_reason(self, eligible: Eligible, result: LoopResult, exhausted: set[int]) -> str:
        if not eligible.any():
            records = result.devices.values()
            return (f"no device can train: of {self.s.num_devices} devices, "
                    f"{len(exhausted)} spent their photo-level budget, "
                    f"{sum(r.gone for r in records)} deleted their data or were excluded, "
                    f"{self.s.num_devices - len(self.node_of)} are absent from this session "
                    "and the rest missed fleet.unavailable_after rounds in a row")
        return self.release.stop_reason()

    def _train_and_release(self, rnd: int, eligible: Eligible, result: LoopResult,
                           exhausted: set[int]) -> dict[str, float]:
        """Steps 2-5: sample, train, record, release. Returns the round's metrics."""
        start = time.time()
        sampled = self.sampler.cohort(range(self.s.num_devices), eligible)  # 2.
        self.progress.round_started(rnd, len(sampled))
        replies = []
        if sampled:  # Poisson sampling may pick nobody; a strategy would wait for nodes
            replies = self.aggregation.collect(rnd, self.strategy.configure_train(  # 3.
                rnd, ArrayRecord(result.shared), ConfigRecord(dict(self.config)),
                SampledGrid(self.grid, [self.node_of[d] for d in sampled])),
                {self.node_of[d]: d for d in sampled})
        reports, failed, malformed = self._parse(replies, sampled, result)  # 4.
        self._refuse_stale_checkpoint(rnd, result, reports, malformed)
        released = self.aggregation.release(rnd, result.shared, reports)  # 5.
        rejected = malformed | {d: f"rejected: {why}" for d, why in released.rejected.items()}
        failed = {d: why for d, why in failed.items()  # not both; not if never asked
                  if d not in rejected and d not in released.excused}
        losses, photos_used = fold_train_reports(result.devices, reports, failed | rejected,
                                                 exhausted)
        for d, why in sorted(rejected.items()):
            self.log(f"round {rnd}: {result.devices[d].device} {why}")
        self._note_availability(rnd, sampled, failed, result)
        result.shared = released.state
        train_seconds = time.time() - start
        metrics = {
            K.TRAIN_LOSS: mean(losses),
            K.DEVICES_SAMPLED: float(len(sampled)),
            K.DEVICES_TRAINED: float(len(released.accepted)),
            K.DEVICES_FAILED: float(len(failed)),
            K.DEVICES_REJECTED: float(len(rejected)),
            K.DEVICES_UNAVAILABLE: float(sum(not r.available(rnd + 1)
                                             for r in result.devices.values())),
            K.DEVICES_ABSENT: float(self.s.num_devices - len(self.node_of)),
            K.DEVICES_BUDGET_EXHAUSTED: float(len(exhausted)),
            K.CONSENT_PHOTOS_USED: float(photos_used),
            K.UPDATES_PER_SECOND: len(released.accepted) / max(train_seconds, 1e-9),
        } | fleet_consent(result.devices.values()) | released.metrics
        if self.s.photo.enabled:
            metrics |= photo_metrics(result.devices.values())
            metrics[K.PHOTO_DELTA] = self.s.photo.delta
        return metrics

    def _parse(self, replies, sampled: list[int], result: LoopResult):
        """Step 4's validation (``server.records.parse_train_replies``), keyed by
        device index: (reports, failed, rejected)."""
        node_of, device_of = self.node_of, self.index
        parsed = parse_train_replies(replies, [node_of[d] for d in sampled],
                                     {node_of[d]: result.devices[d] for d in sampled},
                                     self.s.max_examples)
        return tuple({device_of[node]: value for node, value in part.items()}
                     for part in parsed)

    def _note_availability(self, rnd: int, sampled: list[int], failed: dict[int, str],
                           result: LoopResult) -> None:
        after, pause = self.s.unavailable_after, self.s.retry_after
        note_availability(result.devices, sampled, failed, rnd, after, pause)
        for d in failed:
            record = result.devices[d]
            if after and record.unavailable_until == rnd + pause:
                self.log(f"{record.device} missed {record.missed} rounds in a row "
                         f"(fleet.unavailable_after={after}): not sampled again before round "
                         f"{rnd + pause + 1}")

    def _refuse_stale_checkpoint(self, rnd: int, result: LoopResult, reports,
                                 rejected: dict[int, str]) -> None:
        """A device already trained a later round of this run: this checkpoint is
        older than the devices' state. Stop before releasing anything.

        Only a resumed session can be behind its devices: in a session that started
        the run, the claim is false and the reply is rejected. In a resumed one a
        hostile device can stop the run this way (stopping is the side that
        releases nothing; the operator can leave that device out)."""
        if not self.resumed:
            for d in [d for d, (report, _) in reports.items()
                      if report.newer_state_round is not None]:
                del reports[d]
                rejected[d] = ("rejected: malformed reply (claims state of a later round "
                               "of a run this session started)")
            return
        device, later = newer_state(result.devices, reports, rnd, self.s.rounds)
        if device:
            raise StaleCheckpoint(
                f"{device} already trained round {later} of this run, but the server resumed "
                f"from a checkpoint of round {rnd - 1}: that checkpoint is older than the "
                "devices' state, and replaying from it would release those rounds twice. "
                "Resume from the run's newest checkpoint (resume=<run id> finds it in "
                "checkpoint.dir, then in MLflow). Nothing was released for this round.")

    def _state(self, rnd: int, phase: str, result: LoopResult, panel: list[int],
               exhausted: set[int]) -> LoopState:
        return LoopState(
            round=rnd, phase=phase, shared=result.shared, history=result.history,
            devices={d: asdict(record) for d, record in result.devices.items()},
            exhausted=sorted(exhausted), panel=list(panel),
            release=self.release.state_dict(),
            rng={} if self.secret_sampling else self.sampler.state(),
            strategy=strategy_state(self.strategy))

    def _restore(self, state: LoopState, result: LoopResult) -> tuple[list[int], set[int]]:
        """Put the loop back where ``state`` left it. Records are by device index,
        so devices absent from this session keep theirs (and are not sampled),
        and devices new to it start with a fresh one."""
        outside = sorted(d for d in state.devices if not 0 <= int(d) < self.s.num_devices)
        if outside:
            raise ConfigError(f"the checkpoint has devices {outside[:5]} outside this fleet of "
                              f"fleet.num_devices={self.s.num_devices}; it is not this run's")
        result.shared = dict(state.shared)
        result.history = {int(r): dict(m) for r, m in state.history.items()}
        result.devices |= {int(d): DeviceRecord(**fields) for d, fields in state.devices.items()}
        self.release.load_state_dict(state.release)
        if state.rng:
            self.sampler.restore(state.rng)
        restore_strategy(self.strategy, state.strategy)
        return [int(d) for d in state.panel], {int(d) for d in state.exhausted}

    def _evaluate(self, rnd: int, shared: dict[str, torch.Tensor],
                  panel: list[int]) -> dict[str, float]:
        nodes = [self.node_of[d] for d in panel if d in self.node_of]
        if not nodes:
            return {}
        return fold_evaluate_replies(self.transport.send(self.strategy.configure_evaluate(
            rnd, ArrayRecord(shared), ConfigRecord(dict(self.config)),
            SampledGrid(self.grid, nodes)), "evaluated"), nodes)

    def _newuser(self, shared: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.s.newuser_identities <= 0:
            return {}
        score = newuser_score(self.task, shared, self.personal_init, self.spec,
                              self.s.newuser_identities, self.s.newuser_steps, self.s.seed,
                              self.s.device)
        return {K.NEWUSER[self.task.primary_metric]: score}
