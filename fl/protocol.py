"""The messages between the server and a device: keys and round instructions.

One place defines what travels, so the test that inspects replies, the
ClientApp and the ServerApp agree. Server -> device: the shared weights, the
public initial personal part, and a ConfigRecord with the round's ``Recipe``,
the task and the data spec. Device -> server: its shared weights after training
(if it trained; all shared tensors, so that every Flower strategy can aggregate
them) and a MetricRecord of scalars. Never personal weights, never images.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord

from fl.data.fleet import FleetSpec

ARRAYS = "arrays"  # shared weights, both directions
PERSONAL_INIT = "personal-init"  # public starting point of the personal part
CONFIG = "config"
METRICS = "metrics"
WEIGHT_KEY = "num-examples"

# Reply metric keys (device -> server): scalars only.
TRAIN_LOSS, PHOTO_EPS, STEPS, PARTICIPATIONS = "train-loss", "photo-eps", "steps", "participations"
LEDGER_STEPS, SAMPLE_RATE = "ledger-steps", "sample-rate"  # cumulative DP-SGD steps, last rate
TRAINED, BUDGET_EXHAUSTED = "trained", "budget-exhausted"
# 1 with a trained update when one more participation of the same recipe would pass
# the device's photo-level budget: the server stops sampling it, instead of sending
# a message that would come back refused (``budget-exhausted``).
BUDGET_SPENT = "budget-spent"
PERSONALISED = "personalised"
DEVICE_INDEX = "device-index"  # roll-call reply: the device's pseudonymous index
# Consent and data, reported by every device that answers (counts only, never ids).
PHOTOS_USED, PHOTOS_WITHDRAWN = "photos-used", "photos-withdrawn"
PHOTOS_SKIPPED, PHOTOS_CONVERTED = "photos-skipped", "photos-converted"
OPTED_OUT, DELETED, EXCLUDED = "opted-out", "deleted", "excluded"
STATUS, REASON = "status", "reason"  # ConfigRecord with why a device did not take part
# A device that already holds state of a *later* round of this run than the one it
# is asked to train (the server resumed from an old checkpoint) refuses and reports
# that round, so the server stops instead of releasing a round twice.
NEWER_STATE_ROUND = "newer-state-round"
# 1 when the device's newest stored generation was unreadable and it fell back to
# the one before for its personal weights (``clients.device_state``); never for the
# ledger, which is a refusal instead.
STATE_FALLBACK = "state-fallback"


@dataclass(frozen=True)
class Recipe:
    """What the server asks a device to do in one round."""

    local_epochs: float = 2.0
    personal_epochs: float = 0.0  # >0: fit the personal part alone first (clients.trainer.phases)
    batch_size: int = 8
    lr_shared: float = 0.05
    lr_personal: float = 10.0
    personal_lr_decay: bool = True  # divide lr_personal by the participation number
    personal_lr_noise_scaled: bool = True  # and by the photo-level noise multiplier when above 1
    optimizer: str = "sgd"  # "sgd" | "adam" (see docs/privacy.md before choosing adam)
    photo_dp: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 0.05
    delta: float = 1e-3
    accountant: str = "rdp"
    budget_epsilon: float = 0.0  # 0: no budget
    seed: int = 0
    noise: str = "seeded"  # privacy.noise: "secure" (OS randomness) | "seeded" (from seed)
    consent_default: str = "grant"  # photos of a device without consent.json: grant | deny
    device_storage: str = ".fedface-devices"  # simulated devices' own directories live here
    run: str = ""  # the MLflow run id: a simulated device keeps its state per run
    # Simulated faults (``fl.faults``): comma-separated kinds; "" = none. Real devices
    # refuse a recipe with faults.
    faults: str = ""
    fault_share: float = 0.0
    fault_hang_seconds: float = 0.0  # how long a "hang" device sleeps (past the timeout)
    device: str = "auto"  # the run's `device` key: where a simulated device computes


def round_config(recipe: Recipe, task: dict[str, Any], fleet: FleetSpec) -> ConfigRecord:
    record: dict[str, Any] = {f"recipe.{k}": v for k, v in asdict(recipe).items()}
    record["task"] = json.dumps(task)
    record["fleet"] = json.dumps(asdict(fleet))
    return ConfigRecord(record)


def parse_round_config(config: ConfigRecord) -> tuple[Recipe, dict[str, Any], FleetSpec]:
    missing = [f.name for f in fields(Recipe) if f"recipe.{f.name}" not in config]
    if missing or "task" not in config or "fleet" not in config:
        raise ValueError(
            f"round instructions lack {missing or ['task/fleet']}: the server and this device "
            "run different fedface versions; install the same version on both")
    # Coerce to each field's default's type: records hold bools and ints loosely.
    values = {f.name: type(f.default)(config[f"recipe.{f.name}"]) for f in fields(Recipe)}
    task = json.loads(str(config["task"]))
    fleet = FleetSpec(**json.loads(str(config["fleet"])))
    return Recipe(**values), task, fleet


# Largest epsilon or loss a reply may report: far above any meaningful value, low
# enough that means over a fleet stay finite.
MAX_REPORTED = 1e9


class MalformedReply(ValueError):
    """A device's reply that the server cannot use; the message is the short reason
    recorded in the device's ledger row."""


def _number(metrics, key: str, *, integer: bool = False, low: float = 0.0,
            high: float = math.inf) -> float:
    if key not in metrics:
        raise MalformedReply(f"missing {key!r}")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedReply(f"{key!r} is not a number")
    if not (math.isfinite(value) and low <= value <= high):
        raise MalformedReply(f"{key!r}={value!r} is outside [{low:g}, {high:g}]")
    if integer and value != int(value):
        raise MalformedReply(f"{key!r}={value!r} is not a whole number")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class TrainReport:
    """A device's reply to a training message, typed and checked: the mirror of
    ``Recipe``. Input from a device is untrusted, so every field is validated
    here, in one place, before the server records or aggregates anything; the
    arrays are checked against the weights sent by ``fl.privacy.release``."""

    node: int
    trained: bool
    budget_exhausted: bool
    participations: int
    ledger_steps: int
    sample_rate: float
    photo_eps: float
    train_loss: float
    photos_used: int
    examples: int
    consent: dict[str, int]  # PHOTOS_* counts and OPTED_OUT / DELETED / EXCLUDED, as sent
    reason: str = ""  # why the device did not train, if it did not
    newer_state_round: int | None = None  # the device holds state of this later round
    arrays: dict[str, Any] | None = None  # torch tensors, when the device trained
    budget_spent: bool = False  # trained, and no further participation fits its budget

    @classmethod
    def from_message(cls, reply, max_examples: float = math.inf) -> TrainReport:
        """Raise ``MalformedReply`` with a short reason for anything unusable.
        ``max_examples``: the most training photos a device can hold
        (``data.photos_max``); a larger claim is not plausible."""
        content = reply.content
        if METRICS not in content:
            raise MalformedReply("no metrics record")
        m = content[METRICS]
        # Only what the device reported: an absent count keeps its last value.
        flags = {k: _number(m, k, integer=True, high=1)
                 for k in (OPTED_OUT, DELETED, EXCLUDED) if k in m}
        counts = {k: _number(m, k, integer=True)
                  for k in (PHOTOS_WITHDRAWN, PHOTOS_SKIPPED, PHOTOS_CONVERTED) if k in m}
        newer = m.get(NEWER_STATE_ROUND)
        arrays = None
        if ARRAYS in content:
            try:
                arrays = content[ARRAYS].to_torch_state_dict()
            except Exception as err:  # noqa: BLE001 - any undecodable array is a bad reply
                raise MalformedReply(f"arrays cannot be decoded ({type(err).__name__})") from None
        trained = bool(_number(m, TRAINED, integer=True, high=1))
        if arrays is not None and not trained:
            raise MalformedReply("arrays sent with trained=0")
        loss = m.get(TRAIN_LOSS, math.nan)
        if not (isinstance(loss, int | float) and not isinstance(loss, bool)
                and 0 <= loss <= MAX_REPORTED):
            loss = math.nan  # only a metric: an absurd value is dropped, not averaged
        reason = ""
        if STATUS in content and REASON in content[STATUS]:
            reason = str(content[STATUS][REASON])[:300]
        return cls(
            node=int(reply.metadata.src_node_id),
            trained=trained,
            budget_exhausted=bool(_number(m, BUDGET_EXHAUSTED, integer=True, high=1)),
            participations=_number(m, PARTICIPATIONS, integer=True),
            ledger_steps=_number(m, LEDGER_STEPS, integer=True),
            sample_rate=_number(m, SAMPLE_RATE, high=1.0),
            photo_eps=_number(m, PHOTO_EPS, high=MAX_REPORTED),
            train_loss=float(loss),
            photos_used=_number(m, PHOTOS_USED, integer=True, high=max_examples),
            examples=_number(m, WEIGHT_KEY, integer=True, high=max_examples),
            consent=flags | counts, reason=reason,
            newer_state_round=None if newer is None else _number(m, NEWER_STATE_ROUND,
                                                                   integer=True),
            arrays=arrays,
            budget_spent=BUDGET_SPENT in m and bool(_number(m, BUDGET_SPENT, integer=True,
                                                            high=1)))
