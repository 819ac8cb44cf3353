"""The fedface ClientApp: one device, its consented photos, its private state.

Each round a sampled device opens its photos through consent
(``clients.device``), restores its personal part and photo-level ledger from its
own store (``clients.device_state``), fine-tunes under DP-SGD, saves them back, and replies with
the device-trained *shared* weights and scalar metrics only.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.device import DeviceView, device_index, open_device
from clients.device_state import device_store, load_ledger, load_personal, save_state
from clients.trainer import BUDGET_EXHAUSTED as STATUS_EXHAUSTED
from clients.trainer import TRAINED, train_on_device
from fl import protocol as P
from fl.tasks import Task, get_task

app = ClientApp()


@lru_cache(maxsize=8)
def _task(params_json: str) -> Task:
    """Tasks are stateless: one per worker process and task config."""
    return get_task(json.loads(params_json))


def _prepare(msg: Message, context: Context, before_round: int):
    """Open the device and build its model as of ``before_round`` (its own state
    from earlier rounds only: see ``clients.device_state`` on repeated rounds)."""
    recipe, task_params, fleet = P.parse_round_config(msg.content[P.CONFIG])
    task = _task(json.dumps(task_params, sort_keys=True))
    view = open_device(context, fleet, recipe, task)
    store = device_store(context, recipe, device_index(context))
    model, personalised = None, False
    if view.data is not None:
        model = task.build_model(fleet.image_size)
        model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict(), strict=False)
        personalised = load_personal(store, before_round, model, task,
                                     msg.content[P.PERSONAL_INIT].to_torch_state_dict())
    return recipe, task, fleet, view, model, store, personalised


def _server_round(msg: Message) -> int:
    return int(msg.content[P.CONFIG]["server-round"])


def _reply(metrics: dict, view: DeviceView) -> RecordDict:
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    server_round = _server_round(msg)
    recipe, task, _fleet, view, model, store, _ = _prepare(msg, context, server_round)
    device = device_index(context)
    recipe = dataclasses.replace(recipe, seed=hash((recipe.seed, server_round, device)) % 2**31)
    ledger = load_ledger(store, server_round, recipe.accountant)
    trained, exhausted, steps, loss, rate, used = False, False, 0, 0.0, 0.0, 0
    if view.can_train:
        tensors = task.training_tensors(view.data)
        if recipe.photo_dp:
            _check_photo_delta(recipe.delta, len(tensors[0]))
        outcome = train_on_device(task, model, tensors, recipe, ledger)
        trained, exhausted = outcome.status == TRAINED, outcome.status == STATUS_EXHAUSTED
        steps, rate = outcome.steps, outcome.sample_rate
        loss, used = (outcome.loss, len(tensors[0])) if trained else (0.0, 0)
    metrics = {
        P.WEIGHT_KEY: used,
        P.TRAINED: int(trained),
        P.BUDGET_EXHAUSTED: int(exhausted),
        P.STEPS: steps,
        P.TRAIN_LOSS: loss,
        P.PHOTO_EPS: ledger.epsilon(recipe.delta) if recipe.photo_dp else 0.0,
        P.PARTICIPATIONS: ledger.participations,
        P.LEDGER_STEPS: ledger.steps,
        P.SAMPLE_RATE: rate,
        P.PHOTOS_USED: used,
    }
    content = _reply(metrics, view)
    if trained:
        save_state(store, server_round, model, task, ledger)
        content[P.ARRAYS] = ArrayRecord(task.shared_state(model))
    return Message(content=content, reply_to=msg)


@app.query()
def roll_call(msg: Message, context: Context) -> Message:
    """Say which device this node is, so the server can order and sample devices
    reproducibly (Flower's node ids are random per run)."""
    metrics = MetricRecord({P.DEVICE_INDEX: device_index(context)})
    return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    # Evaluation follows the round's training: it sees the state that round wrote.
    _, task, fleet, view, model, _, personalised = _prepare(msg, context, _server_round(msg) + 1)
    metrics = {P.WEIGHT_KEY: 0, P.PERSONALISED: int(personalised)}
    if view.can_evaluate:
        metrics |= task.evaluate_device(model, view.data, fleet)
        metrics[P.WEIGHT_KEY] = len(view.data.heldout)
    return Message(content=_reply(metrics, view), reply_to=msg)
