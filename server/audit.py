"""The empirical privacy audit of one real simulated run (``python -m experiments.audit``).

One run of the configured experiment, through ``server.simulation.simulate``,
with two kinds of canary and one observer:

* **canary photos** (photo level): devices of the audit run the audit's own
  ClientApp (``clients.audit``), which adds each device's included canaries to
  its photos. The coins come from the operating system and live only in the
  ``Placement`` handed to that app and, after the run, to the one-run count.
* **canary devices** (user level): a share of the fleet are canary users; the
  observer replaces each reply they send with the weights sent plus a fixed
  random direction scaled to the clip (``fl.audit.canary_devices``), which the
  release then clips, sums and noises like any update. Held-out directions are
  never inserted.
* **the observer** (``AuditGrid``, the ``wrap_grid`` hook) sees every message the
  server sends and receives: exactly the server's view, which is the photo-level
  adversary's. It keeps the weights sent each round, each canary device's
  update, and each round's released weights.

After the run the server-side adversary scores every canary photo from its
device's updates (``fl.audit.canary_photos``), the one-run bound turns the
guesses into a lower bound (``fl.audit.one_run``), the final model change gives
the user-level estimate, and a curious server inverts one device's first update
(``fl.audit.inversion``; the released aggregate when user-level DP is on, as
under secure aggregation). Both epsilons are compared at the audit's delta'
(``tracking.audit_delta``): at fedface's default photo delta of 2.5e-3 the one-
run bound's 2 m delta term leaves nothing to certify.

The audit run's privacy spend is its own: its ledgers, its MLflow run and its
device state are the audit's, never a real run's.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType
from omegaconf import DictConfig, OmegaConf

from fl import config as C
from fl import protocol as P
from fl.audit import canary_devices as CD
from fl.audit import canary_photos as CP
from fl.audit import inversion as INV
from fl.audit import one_run
from fl.console import say
from fl.data.device_data import load_device_data
from fl.privacy.ledger import epsilon_of
from fl.privacy.plan import PrivacyPlan, privacy_plan
from fl.tasks import get_task
from server.app import Summary


@dataclass(frozen=True)
class AuditSettings:
    """``tracking.audit_*``: what the audit plants and how hard it attacks."""

    delta: float = 1e-5  # delta' at which both epsilons are compared
    confidence: float = 0.95
    canaries_per_device: int = 4  # canary photo slots per photo-canary device
    user_canaries: float = 0.2  # share of the fleet that are canary users
    inversion_devices: int = 2  # devices kept free of canaries, attacked by inversion
    inversion_steps: int = 300
    inversion_images: int = 4

    @classmethod
    def from_config(cls, cfg: DictConfig) -> AuditSettings:
        t = cfg.tracking
        return cls(float(t.audit_delta), float(t.audit_confidence),
                   int(t.audit_canaries_per_device), float(t.audit_user_canaries),
                   int(t.audit_inversion_devices), int(t.audit_inversion_steps),
                   int(t.audit_inversion_images))


MIN_USER_CANARIES = 5  # inserted (and held-out) canary users needed for an estimate


@dataclass
class Roles:
    """Which device plays what (fixed before any coin is drawn)."""

    inversion: list[int]
    user_canaries: dict[int, int]  # device -> canary direction index
    held_out: list[int]  # direction indices never inserted
    photo_devices: list[int]


def user_canary_count(num_devices: int, share: float, available: int,
                      sampled: float = 1.0) -> int:
    """How many canary users: ``share`` of the fleet, raised (when ``share`` > 0) so
    that about ``2 * MIN_USER_CANARIES`` are expected to be sampled at least once
    (``sampled``: a device's chance of that over the run), at most half of the
    ``available`` devices, which must keep at least one photo device.

    The share alone gave 4 canary users on a 20-device, 3-round run, of which
    fewer than 5 were sampled: no estimate."""
    if share <= 0:
        return 0
    wanted = round(share * num_devices)
    if sampled > 0:
        wanted = max(wanted, math.ceil(2 * MIN_USER_CANARIES / sampled))
    return max(0, min(wanted, available // 2, available - 1))


def chance_sampled(num_devices: int, per_round: int, rounds: int) -> float:
    """A device's chance of being drawn at least once in ``rounds`` rounds at rate
    ``per_round / num_devices`` (Poisson or fixed-size: the same marginal)."""
    return 1.0 - (1.0 - min(1.0, per_round / num_devices)) ** rounds


def assign_roles(num_devices: int, s: AuditSettings, seed: int, sampled: float = 1.0) -> Roles:
    """Inversion targets first (no canaries), then canary users, the rest hold
    canary photos. A seeded shuffle: who is what is public, only coins are secret.
    ``sampled``: a device's chance of taking part in the run (``chance_sampled``)."""
    order = list(np.random.default_rng([seed, 0xA0D17]).permutation(num_devices))
    inv = [int(d) for d in order[:min(s.inversion_devices, num_devices)]]
    rest = order[len(inv):]
    n_user = user_canary_count(num_devices, s.user_canaries, len(rest), sampled)
    users = {int(d): i for i, d in enumerate(rest[:n_user])}
    held = list(range(n_user, 2 * n_user))
    photo = sorted(int(d) for d in rest[n_user:])
    return Roles(inv, users, held, photo)


@dataclass
class Observed:
    """What the server saw: weights sent per round, canary devices' updates,
    released weights per round, and each device's DP-SGD schedule."""

    sent: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    released: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    updates: list[tuple[int, int, dict[str, torch.Tensor]]] = field(default_factory=list)
    schedules: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    user_inserted: dict[int, int] = field(default_factory=dict)  # direction -> times


class AuditGrid:
    """Flower's grid seen by the audit: passes everything through, records the
    server's view, and stands in for canary users' replies."""

    def __init__(self, grid, task, roles: Roles, watch: set[int], user_seed: int,
                 clip: float) -> None:
        self._grid, self.task, self.roles, self.watch = grid, task, roles, watch
        self.user_seed, self.clip = user_seed, clip
        self.seen = Observed()
        self._pending: dict[str, tuple[int, int]] = {}  # message id -> (node, round)
        self._devices: dict[int, int] = {}

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def _device(self, node: int) -> int | None:
        if node not in self._devices:
            offered = getattr(self._grid, "engine_partitions", None)
            mapping = offered(5.0) if callable(offered) else None
            self._devices.update(mapping or {})
        return self._devices.get(node)

    def send_and_receive(self, messages, *args, **kwargs):
        """The roll call: learn which node is which device from its answers."""
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        for reply in replies:
            if not reply.has_error() and P.METRICS in reply.content and \
                    P.DEVICE_INDEX in reply.content[P.METRICS]:
                self._devices[int(reply.metadata.src_node_id)] = int(
                    reply.content[P.METRICS][P.DEVICE_INDEX])
        return replies

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        for message, mid in zip(messages, ids):
            kind = message.metadata.message_type.split(".")[0]
            if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
                continue
            rnd = int(message.content[P.CONFIG]["server-round"])
            arrays = message.content[P.ARRAYS].to_torch_state_dict()
            if kind == MessageType.TRAIN:
                self.seen.sent.setdefault(rnd, arrays)
                self._pending[mid] = (int(message.metadata.dst_node_id), rnd)
            else:
                self.seen.released.setdefault(rnd, arrays)
        return ids

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            pending = self._pending.pop(reply.metadata.reply_to_message_id, None)
            if pending is None:
                continue
            node, rnd = pending
            device = self._device(node)
            if device is None or reply.has_error() or P.ARRAYS not in reply.content:
                continue
            self._observe(reply, device, rnd)
        return replies

    def _observe(self, reply: Message, device: int, rnd: int) -> None:
        sent = self.seen.sent[rnd]
        metrics = reply.content[P.METRICS]
        if device in self.roles.user_canaries:
            self._stand_in(reply, device, sent)
            return
        if device not in self.watch:
            return
        received = reply.content[P.ARRAYS].to_torch_state_dict()
        keys = CP.trained_keys(self.task, sent)
        self.seen.updates.append((rnd, device, {k: received[k].clone() for k in keys}))
        if int(metrics.get(P.TRAINED, 0)):
            self.seen.schedules.setdefault(device, []).append(
                (float(metrics.get(P.SAMPLE_RATE, 0.0)), int(metrics.get(P.STEPS, 0))))

    def _stand_in(self, reply: Message, device: int, sent: dict[str, torch.Tensor]) -> None:
        """A canary user's reply: the weights sent plus its direction at norm C
        (the clip; without user-level DP, its real update's norm)."""
        received = reply.content[P.ARRAYS].to_torch_state_dict()
        keys = CP.trained_keys(self.task, sent)
        norm = self.clip or float(np.linalg.norm(CD.flatten(received, keys)
                                                 - CD.flatten(sent, keys)))
        index = self.roles.user_canaries[device]
        step = CD.canary_update(self.user_seed, index, norm, sent, keys)
        reply.content[P.ARRAYS] = ArrayRecord(
            {k: (sent[k] + step[k]) if k in step else sent[k] for k in sent})
        self.seen.user_inserted[index] = self.seen.user_inserted.get(index, 0) + 1


# --- after the run -------------------------------------------------------------------

def _model_at(task, spec, state, personal_init):
    model = task.build_model(spec.image_size)
    model.load_state_dict({**state, **personal_init}, strict=False)
    return model


SCORES = {"presence": CP.score_update, "loss_drop": CP.loss_drop}  # the server's two tests


def photo_scores(task, spec, placement: CP.Placement, seen: Observed, personal_init,
                 kind: str = "presence") -> dict[int, float]:
    """Each canary's score (``SCORES[kind]``), summed over every update its device sent."""
    scores: dict[int, float] = {}
    model = task.build_model(spec.image_size)
    nuisance: dict[int, np.ndarray] = {}  # per round: it depends only on the weights sent
    for rnd, device, received in seen.updates:
        if device not in placement.slots:
            continue
        extra = {}
        if kind == "presence":
            if rnd not in nuisance:
                nuisance[rnd] = CP.nuisance_directions(task, model, seen.sent[rnd],
                                                       personal_init, spec.image_size)
            extra = {"nuisance": nuisance[rnd]}
        for c, v in SCORES[kind](task, model, placement, device, seen.sent[rnd], received,
                                 personal_init, spec.image_size, **extra).items():
            scores[c] = scores.get(c, 0.0) + v
    return scores


def photo_theory(plan: PrivacyPlan, seen: Observed, devices, delta: float) -> float:
    """The largest accountant epsilon at ``delta`` among the audited devices, from
    the schedules their replies reported (what their ledgers record)."""
    if not plan.photo.enabled:
        return math.inf
    values = [epsilon_of([(plan.photo.noise_multiplier, q, n) for q, n in seen.schedules[d]],
                         delta, plan.photo.accountant) for d in devices if d in seen.schedules]
    return max(values, default=0.0)


def user_theory(plan: PrivacyPlan, rounds: int, delta: float) -> float:
    if not plan.user.enabled:
        return math.inf
    mechanism = replace(plan.user.real_mechanism, delta=delta)
    return float(mechanism.epsilon(rounds))


@dataclass(frozen=True)
class AuditResult:
    run_id: str
    photo: one_run.OneRunAudit | None
    photo_theory: float
    user: CD.UserEstimate | None
    user_theory: float
    inversion: INV.Inversion | None
    rounds: int
    settings: AuditSettings
    planted_bug: str | None
    ui_command: str = ""
    photo_schedules: list[list[tuple[float, int]]] | None = None  # audited devices'
    summary: Summary | None = None  # the audited run's (what experiments.train returns)

    @property
    def violation(self) -> bool:
        photo = self.photo is not None and self.photo.epsilon_lower > self.photo_theory + 1e-9
        user = self.user is not None and self.user.interval[0] > self.user_theory + 1e-9
        return bool(photo or user)


def check_auditable(cfg: DictConfig) -> None:
    if cfg.data.source == "device":
        raise C.ConfigError("the audit plants canaries and inverts photos: it runs only on "
                            "SynthFaces or data you own, never data=device")
    if cfg.task.name != "swap":
        raise C.ConfigError(f"the audit supports task=swap (got task={cfg.task.name}): its "
                            "canaries and inversion use the photo-only device loss")
    if OmegaConf.select(cfg, "aggregation.secure", default=False):
        raise C.ConfigError("the audit plays the server that sees each device's update; run it "
                            "with aggregation.secure=false (under secure aggregation the "
                            "photo-level adversary sees only the sum)")
    if cfg.faults.kinds:
        raise C.ConfigError("audit with faults.kinds=[] (simulated faulty devices would "
                            "be read as canary signal)")
    if float(OmegaConf.select(cfg, "local.personal_epochs", default=0) or 0) > 0:
        raise C.ConfigError(
            "audit with local.personal_epochs=0: each canary photo is scored at the public "
            "personal part, which a personal phase moves before the shared weights train "
            "(a planted noise-off bug then went unseen). The one-phase recipe runs the same "
            "DP-SGD at the same noise and clip; python -m experiments.audit sets it unless "
            "you give it (docs/privacy.md, \"Empirical audit\")")


def run_audit(cfg: DictConfig, log: Callable[[str], None] = say,
              planted_bug: str | None = None, coins: np.ndarray | None = None) -> AuditResult:
    """Run the configured experiment with canaries planted and audit it.
    ``planted_bug`` and ``coins`` are test-only hooks (``clients.audit``)."""
    from clients.audit import audit_client_app
    from server.simulation import simulate

    check_auditable(cfg)
    C.validate(cfg)
    s = AuditSettings.from_config(cfg)
    task, spec, plan = get_task(C.task_params(cfg)), C.fleet_spec(cfg), privacy_plan(cfg)
    roles = assign_roles(spec.num_devices, s, int(cfg.seed), chance_sampled(
        spec.num_devices, int(cfg.fleet.devices_per_round), int(cfg.fleet.rounds)))
    placement = CP.place(roles.photo_devices, s.canaries_per_device, int(cfg.local.batch_size),
                         seed=int(cfg.seed), coins=coins)
    user_seed = secrets.randbits(63)  # directions of canary users: never logged
    clip = float(plan.user.mechanism.clip) if plan.user.enabled else 0.0
    watch = set(roles.photo_devices) | set(roles.inversion)
    holder: dict[str, AuditGrid] = {}

    def wrap(grid):
        holder["grid"] = AuditGrid(grid, task, roles, watch, user_seed, clip)
        return holder["grid"]

    log(f"audit: {placement.canaries} canary photos on {len(placement.slots)} devices, "
        f"{len(roles.user_canaries)} canary users, inversion of device(s) {roles.inversion}")
    app = audit_client_app(placement, spec.image_size, int(cfg.local.batch_size),
                           spec.photos_max, planted_bug)
    started = time.perf_counter()
    summary = simulate(cfg, wrap_grid=wrap, client_app=app)
    simulated = time.perf_counter()
    seen = holder["grid"].seen
    rounds = max((r for r in summary.history if r > 0), default=0)
    from fl.pretrain import load_checkpoint
    personal_init = load_checkpoint(cfg.model.init)["personal_init"] if cfg.model.init else {}
    personal_init = {**task.personal_state(task.build_model(spec.image_size)), **personal_init}

    photo, photo_eps_theory, schedules = _photo_audit(task, spec, plan, placement, seen,
                                                      personal_init, s)
    user, user_eps_theory = _user_audit(task, plan, roles, seen, summary, s, user_seed, rounds)
    scored = time.perf_counter()
    inversion = _inversion(task, spec, plan, roles, seen, personal_init, s, int(cfg.seed))
    log(f"audit: simulation {simulated - started:.0f} s, canary scores and user estimate "
        f"{scored - simulated:.0f} s, inversion {time.perf_counter() - scored:.0f} s; "
        f"{len(seen.user_inserted)} canary users inserted")
    return AuditResult(summary.run_id, photo, photo_eps_theory, user, user_eps_theory,
                       inversion, rounds, s, planted_bug, summary.ui_command, schedules,
                       summary)


def _photo_audit(task, spec, plan, placement, seen, personal_init, s):
    # Both tests, each at half the error budget (Bonferroni), the better one reported.
    result, audited = None, []
    for kind in SCORES:
        scores = photo_scores(task, spec, placement, seen, personal_init, kind)
        audited = sorted(scores)  # canaries whose device trained: independent of the coins
        if not audited:
            return None, math.inf, None
        found = one_run.audit([scores[c] for c in audited], placement.included[audited],
                              s.delta, 1 - (1 - s.confidence) / len(SCORES))
        found = replace(found, confidence=s.confidence)
        if result is None or found.epsilon_lower > result.epsilon_lower or (
                found.epsilon_lower == result.epsilon_lower
                and found.guesses.correct > result.guesses.correct):
            result = found
    devices = sorted({placement.device_of()[c] for c in audited})
    schedules = [seen.schedules[d] for d in devices if d in seen.schedules]
    return result, photo_theory(plan, seen, devices, s.delta), schedules


def _final_shared(run_id: str) -> dict[str, torch.Tensor]:
    import mlflow

    from fl.pretrain import load_checkpoint
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/shared.pt")
    return load_checkpoint(path)["shared"]


def _user_audit(task, plan, roles, seen, summary, s, user_seed, rounds):
    theory = user_theory(plan, rounds, s.delta)
    inserted = sorted(seen.user_inserted)
    if len(inserted) < MIN_USER_CANARIES or not seen.sent:
        return None, theory  # too few to fit a spread (a bootstrap of 2 is degenerate)
    initial = seen.sent[min(seen.sent)]
    keys = CP.trained_keys(task, initial)
    change = CD.model_change(initial, _final_shared(summary.run_id), keys)
    if not np.any(change):
        return None, theory
    cos_in = CD.cosines(user_seed, inserted, change)
    cos_out = CD.cosines(user_seed, roles.held_out, change) \
        if len(roles.held_out) >= MIN_USER_CANARIES else None
    if cos_out is None and change.size < CD.CLOSED_FORM_MIN_DIM:
        return None, theory
    estimate = CD.estimate(cos_in, cos_out, delta=s.delta, dim=change.size,
                           confidence=s.confidence)
    return estimate, theory


def _inversion(task, spec, plan, roles, seen, personal_init, s, seed):
    """Invert the first update the server saw of an inversion device (under
    user-level DP: the aggregate released in that round)."""
    first = next(((r, d, u) for r, d, u in sorted(seen.updates, key=lambda x: x[0])
                  if d in roles.inversion), None)
    if first is None or s.inversion_steps == 0:
        return None
    rnd, device, received = first
    sent = seen.sent[rnd]
    keys = CP.trained_keys(task, sent)
    seen_as = "device update"
    if plan.user.enabled:
        released = seen.released.get(rnd) or seen.sent.get(rnd + 1)
        if released is None:
            return None
        received, seen_as = {k: released[k] for k in keys}, "released aggregate"
    update = {k: received[k].float() - sent[k].float() for k in keys}
    model = _model_at(task, spec, sent, personal_init)
    truths = load_device_data(spec, device).train
    return INV.attack(task, model, keys, update, truths, INV.mean_public_face(spec),
                      s.inversion_steps, s.inversion_images, seen_as, seed)


# --- MLflow ---------------------------------------------------------------------------

AUDIT_ROLE = "audit"


def log_audit(cfg: DictConfig, result: AuditResult, role: bool = True,
              log: Callable[[str], None] = say) -> dict:
    """Add the audit to its run: ``audit/*`` metrics, report and inversion grid;
    tag ``fedface.role=audit`` when ``role`` (``experiments.audit``)."""
    import tempfile
    from pathlib import Path

    import mlflow

    from fl.audit import report as R
    from fl.tracking.mlflow_run import RunLogger
    from fl.tracking.sweep import ROLE_TAG

    plan = privacy_plan(cfg)
    run_deltas = {"photo": plan.photo.delta if plan.photo.enabled else None,
                  "user": plan.user.real_mechanism.delta if plan.user.enabled else None}
    at_run = {"photo": _photo_at(plan, result, run_deltas["photo"]),
              "user": user_theory(plan, result.rounds, run_deltas["user"])
              if plan.user.enabled else math.inf}
    data = R.build(result, run_deltas, at_run)
    logger = RunLogger(cfg, resume_run_id=result.run_id)
    try:
        if role:
            logger.set_tag(ROLE_TAG, AUDIT_ROLE)
        logger.set_tag("fedface.audit_violation", str(int(result.violation)))
        logger.log_metrics(R.metrics(data), step=result.rounds)
        mlflow.log_text(R.to_markdown(data), "audit/report.md")
        mlflow.log_text(R.as_json(data), "audit/report.json")
        if result.inversion is not None:
            inv = result.inversion
            grid = INV.grid_image([(inv.seen, inv.truth, inv.reconstructions)],
                                  _mean_face(cfg))
            with tempfile.TemporaryDirectory() as tmp:
                from PIL import Image
                path = Path(tmp) / "inversion.png"
                Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3),
                                             Image.NEAREST).save(path)
                mlflow.log_artifact(str(path), artifact_path="audit")
    finally:
        logger.end()
    photo, user = data["photo"], data["user"]
    log(f"audit (delta'={result.settings.delta:g}): photo lower bound "
        f"{photo['epsilon_lower_bound']} vs theory {photo['epsilon_theory']} "
        f"({photo['correct_guesses']}/{photo['guesses']} right of {photo['canaries']}); "
        f"user estimate {user['epsilon_lower_bound']} vs theory {user['epsilon_theory']}; "
        f"inversion PSNR {data['inversion']['psnr']} vs mean face "
        f"{data['inversion']['mean_face_psnr']}"
        + ("; VIOLATION" if result.violation else ""))
    return data


def _mean_face(cfg: DictConfig) -> np.ndarray:
    return INV.mean_public_face(C.fleet_spec(cfg))


def _photo_at(plan: PrivacyPlan, result: AuditResult, delta: float | None) -> float:
    """The photo theory at the run's own delta (the same devices and schedules)."""
    if delta is None or result.photo_schedules is None:
        return math.inf
    return max((epsilon_of([(plan.photo.noise_multiplier, q, n) for q, n in sched], delta,
                           plan.photo.accountant) for sched in result.photo_schedules),
               default=0.0)
