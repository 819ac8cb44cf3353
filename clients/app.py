"""The fedface ClientApp: one device, its consented photos, its private state.

Each round a sampled device opens its photos through consent
(``clients.device``), restores its personal part and photo-level ledger from its
own store (``clients.device_state``), fine-tunes under DP-SGD, saves them back, and replies with
the device-trained *shared* weights and scalar metrics only.

A device does not trust the server's instructions where its users' privacy
depends on them. Before touching its photos it refuses, with a not-trained reply
that says why:

* seeded noise on a real device (one started with a ``data-dir`` or
  ``state-dir``, which only its owner sets): anyone who knows the run's seed
  could rebuild that noise and subtract it from the update;
* simulated faults (``faults.kinds``) on a real device: only simulated devices
  act them out (``clients.faults``, a mod around ``train``);
* a round older than its own state of this run: the server resumed from an
  older checkpoint than the device's state, and would otherwise have it release
  a round again as if the later ones had not happened. The reply carries
  ``P.NEWER_STATE_ROUND`` so the server stops and says which checkpoint to use;
* a personal part fitted without photo-level DP (``experiments.enroll``, or a
  run without it) under a photo-level DP recipe: its photos would shape every
  update through it, outside any accounting (``NOT_DP_REFUSAL``, docs/privacy.md);
* storage it cannot use safely (``_holding_state``): a real device without its
  own ``state-dir``, a state directory another process is using, an unreadable
  newest ledger, a full disk. Every train and evaluate call holds the state
  directory's lock from start to end (``clients.device_state``).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from clients import secagg
from clients.device import (
    DeviceView,
    device_index,
    is_real_device,
    open_device,
    require_state_dir,
)
from clients.device_state import (
    DeviceStore,
    StoreUnavailable,
    device_store,
    load_ledger,
    load_ledger_before,
    load_personal,
    save_state,
    update_digest,
)
from clients.faults import simulated_faults
from clients.trainer import BUDGET_EXHAUSTED as STATUS_EXHAUSTED
from clients.trainer import TRAINED, Outcome, dp_generator, train_on_device
from fl import protocol as P
from fl.data.fleet import FleetSpec
from fl.device import place, resolve
from fl.privacy.ledger import PhotoLedger
from fl.privacy.noise import SEEDED
from fl.tasks import Task, get_task

log = logging.getLogger(__name__)
app = ClientApp()


@lru_cache(maxsize=8)
def _task(params_json: str) -> Task:
    """Tasks are stateless: one per worker process and task config."""
    return get_task(json.loads(params_json))


def _instructions(msg: Message, context: Context) -> tuple[P.Recipe, Task, FleetSpec,
                                                          DeviceStore]:
    """The round's recipe, task and data spec, and this device's own store."""
    recipe, task_params, fleet = P.parse_round_config(msg.content[P.CONFIG])
    task = _task(json.dumps(task_params, sort_keys=True))
    return recipe, task, fleet, device_store(context, recipe, device_index(context))


def _prepare(msg: Message, context: Context, recipe: P.Recipe, task: Task, fleet: FleetSpec,
             store: DeviceStore, before_round: int):
    """Open the device and build its model with its personal weights as of
    ``before_round`` (from earlier rounds only: see ``clients.device_state`` on
    repeated rounds)."""
    view = open_device(context, fleet, recipe, task)
    model, personalised = None, False
    if view.data is not None:
        model = task.build_model(fleet.image_size)
        model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict(), strict=False)
        personalised = load_personal(store, before_round, model, task,
                                     msg.content[P.PERSONAL_INIT].to_torch_state_dict())
    return view, model, personalised


def _server_round(msg: Message) -> int:
    return int(msg.content[P.CONFIG]["server-round"])


def _reply(metrics: dict, view: DeviceView, store: DeviceStore) -> RecordDict:
    if store.fallbacks:  # an unreadable generation was passed over: say so
        metrics = metrics | {P.STATE_FALLBACK: 1}
    content = RecordDict({P.METRICS: MetricRecord(metrics | view.report)})
    if view.reason:
        content[P.STATUS] = ConfigRecord({P.REASON: view.reason})
    return content


def _check_photo_delta(delta: float, num_photos: int) -> None:
    if delta >= 1.0 / num_photos:
        raise ValueError(
            f"photo-level delta {delta} is not below 1/{num_photos} (this device's photo "
            "count): a mechanism that may leak one photo outright would pass. Lower "
            "privacy.photo.delta."
        )


SEEDED_REFUSAL = ("refused: the server asked for seeded noise, which anyone who knows the "
                  "run's seed can rebuild; real devices train only with privacy.noise=secure")


FAULTS_REFUSAL = ("refused: the server asked this device to simulate faults (faults.kinds), "
                  "which only simulated devices do")


NOT_DP_REFUSAL = ("refused: this device's personal part was fitted without photo-level DP "
                  "(enrolled on the device, or trained in a run without it), and would carry "
                  "its photos into this update outside any accounting; its owner must refit "
                  "it (docs/privacy.md) before it joins photo-level DP training")


def _refusal(context: Context, recipe: P.Recipe, store: DeviceStore,
             server_round: int, msg: Message | None = None) -> tuple[str, dict]:
    """Why this device will not train this round ("" if it will), and the metrics
    that say so to the server."""
    plain = secagg.plain_refusal(context, msg) if msg is not None else ""
    if plain:
        return plain, {}
    if recipe.noise == SEEDED and is_real_device(context):
        return SEEDED_REFUSAL, {}
    if recipe.faults and is_real_device(context):
        return FAULTS_REFUSAL, {}
    newest = store.newest_round()
    if newest is not None and newest > server_round:
        reason = (f"refused: this device already holds its state after round {newest} of "
                  f"this run but was asked to train round {server_round}: the server resumed "
                  "from a checkpoint older than this device's state; resume from the run's "
                  "newest checkpoint")
        return reason, {P.NEWER_STATE_ROUND: newest}
    return "", {}


def _train_metrics(recipe: P.Recipe, ledger: PhotoLedger, outcome: Outcome | None = None,
                   used: int = 0) -> dict:
    """A training reply's metrics (``outcome``: None if it did not train); the
    ledger's are sent whether or not it trained."""
    trained = outcome is not None and outcome.status == TRAINED
    return {
        P.WEIGHT_KEY: used,
        P.TRAINED: int(trained),
        P.BUDGET_EXHAUSTED: int(outcome is not None and outcome.status == STATUS_EXHAUSTED),
        P.STEPS: outcome.steps if outcome else 0,
        P.TRAIN_LOSS: outcome.loss if trained else 0.0,
        P.PHOTO_EPS: ledger.epsilon(recipe.delta) if recipe.photo_dp else 0.0,
        P.PARTICIPATIONS: ledger.participations,
        P.LEDGER_STEPS: ledger.steps,
        P.SAMPLE_RATE: outcome.sample_rate if outcome else 0.0,
        P.PHOTOS_USED: used,
    }


def _fine_tune(task: Task, model, view: DeviceView, recipe: P.Recipe, ledger: PhotoLedger,
               server_round: int, device: int) -> tuple[Outcome | None, int]:
    """Train on the consented photos if there are any; (outcome, photos used)."""
    if not view.can_train:
        return None, 0
    tensors = task.training_tensors(view.data)
    if recipe.photo_dp:
        _check_photo_delta(recipe.delta, len(tensors[0]))
    model.to(resolve(recipe.device))  # the run's `device` key (fl.device)
    try:
        outcome = train_on_device(task, model, tensors, recipe, ledger,
                                  dp_generator(recipe, server_round, device))
    finally:
        model.cpu()  # the reply and the device's stored state hold CPU tensors
    return outcome, len(tensors[0]) if outcome.status == TRAINED else 0


def _holding_state(msg: Message, context: Context, call_next) -> Message:
    """A Flower mod around ``train`` and ``evaluate``: the whole call holds the
    device's state directory (``DeviceStore.lock``), so two processes never
    interleave on one device's ledger. What the store cannot do (a real device
    without a state-dir, a directory in use, an unreadable ledger, a full disk)
    is a refusal that says why, never a crash; the details, which name paths,
    stay in the device's own log."""
    recipe, _, fleet, store = _instructions(msg, context)
    try:
        require_state_dir(context, fleet)
        with store.lock():
            return call_next(msg, context)
    except StoreUnavailable as err:
        log.warning("device %s: %s", device_index(context), err)
        metrics = {P.WEIGHT_KEY: 0, P.PERSONALISED: 0}
        if msg.metadata.message_type.split(".")[0] == MessageType.TRAIN:
            ledger = PhotoLedger.from_config(err.ledger) if err.ledger else \
                PhotoLedger(accountant=recipe.accountant)
            metrics = _train_metrics(recipe, ledger)
        content = RecordDict({P.METRICS: MetricRecord(metrics),
                              P.STATUS: ConfigRecord({P.REASON: err.public})})
        return Message(content=content, reply_to=msg)


@app.train(mods=[simulated_faults, _holding_state, secagg.masked_training])
def train(msg: Message, context: Context) -> Message:
    server_round = _server_round(msg)
    recipe, task, fleet, store = _instructions(msg, context)
    newest = load_ledger(store, recipe.accountant)  # never rolled back
    reason, extra = _refusal(context, recipe, store, server_round, msg)
    if reason:
        content = RecordDict({P.METRICS: MetricRecord(_train_metrics(recipe, newest) | extra),
                              P.STATUS: ConfigRecord({P.REASON: reason})})
        return Message(content=content, reply_to=msg)
    # A repeat of a round the server abandoned starts where the first attempt did:
    # personal weights, step sizes and budget check as of before the round.
    attempt = store.attempt_digest(server_round)
    start = load_ledger_before(store, server_round, recipe.accountant) if attempt is not None \
        else newest
    view, model, _ = _prepare(msg, context, recipe, task, fleet, store, server_round)
    if recipe.photo_dp and store.fitted_without_dp():
        content = RecordDict({P.METRICS: MetricRecord(_train_metrics(recipe, newest)),
                              P.STATUS: ConfigRecord({P.REASON: NOT_DP_REFUSAL})})
        return Message(content=content, reply_to=msg)
    outcome, used = _fine_tune(task, model, view, recipe, start, server_round,
                               device_index(context))
    ledger, update, digest = newest, None, ""
    if outcome is not None and outcome.status == TRAINED:
        update = task.shared_state(model)
        digest = update_digest(update)
        ledger = _ledger_after(recipe, start, newest, attempt, digest, outcome)
        if ledger is None:  # a different repeat would pass the budget: nothing leaves
            outcome, used, update, ledger = _exhausted(newest, recipe, outcome), 0, None, newest
    metrics = _train_metrics(recipe, ledger, outcome, used)
    if update is not None and _spent_after(recipe, ledger, outcome):
        metrics[P.BUDGET_SPENT] = 1
    content = _reply(metrics, view, store)
    if update is not None:
        # Recorded on the device before anything of the update leaves it.
        save_state(store, server_round, model, task, ledger, digest,
                   personal_dp=recipe.photo_dp)
        content[P.ARRAYS] = ArrayRecord(update)
    return Message(content=content, reply_to=msg)


def _ledger_after(recipe: P.Recipe, start: PhotoLedger, newest: PhotoLedger,
                  attempt: str | None, digest: str, outcome: Outcome) -> PhotoLedger | None:
    """The ledger to record for an update about to leave the device.

    First attempt: ``start`` (the newest ledger) with this run recorded. Repeat of
    an abandoned attempt: the newest ledger (which already holds the attempt) if
    the update is bit-identical to the one that left before, since the same value
    published twice reveals nothing more; otherwise the newest ledger plus this
    run, or None if that passes the budget.
    """
    if attempt is None:
        return start
    if digest == attempt:
        return newest
    planned = (recipe.noise_multiplier, outcome.sample_rate, outcome.steps) \
        if recipe.photo_dp else None
    if recipe.photo_dp and not newest.admits(*planned, recipe.delta, recipe.budget_epsilon):
        return None
    return newest.extended(planned)


def _spent_after(recipe: P.Recipe, ledger: PhotoLedger, outcome: Outcome) -> bool:
    """Whether one more participation like this one would pass the budget: the
    device says so with its update, so the server stops sampling it rather than
    send it a message it would refuse: the same bit that refusal would send a round
    later (docs/privacy.md, "Budgets")."""
    return recipe.photo_dp and not ledger.admits(
        recipe.noise_multiplier, outcome.sample_rate, outcome.steps, recipe.delta,
        recipe.budget_epsilon)


def _exhausted(ledger: PhotoLedger, recipe: P.Recipe, outcome: Outcome) -> Outcome:
    return Outcome(STATUS_EXHAUSTED, epsilon=ledger.epsilon(recipe.delta),
                   sample_rate=outcome.sample_rate)


# Secure aggregation's protocol stages (``clients.secagg``; training is ``train``).
app.query("secagg_setup")(secagg.setup)
app.query("secagg_share_keys")(secagg.share_keys)
app.query("secagg_unmask")(secagg.unmask)


@app.query()
def roll_call(msg: Message, context: Context) -> Message:
    """Say which device this node is, so the server can order and sample devices
    reproducibly (Flower's node ids are random per run)."""
    metrics = MetricRecord({P.DEVICE_INDEX: device_index(context)})
    return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)


@app.evaluate(mods=[_holding_state])
def evaluate(msg: Message, context: Context) -> Message:
    # Evaluation follows the round's training: it sees the state that round wrote.
    recipe, task, fleet, store = _instructions(msg, context)
    view, model, personalised = _prepare(msg, context, recipe, task, fleet, store,
                                         _server_round(msg) + 1)
    metrics = {P.WEIGHT_KEY: 0, P.PERSONALISED: int(personalised)}
    if view.can_evaluate:
        place(resolve(recipe.device), model)  # the run's `device` key (fl.device)
        metrics |= task.evaluate_device(model, view.data, fleet)
        metrics[P.WEIGHT_KEY] = len(view.data.heldout)
    return Message(content=_reply(metrics, view, store), reply_to=msg)
