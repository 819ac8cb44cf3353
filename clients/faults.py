"""A simulated device acting out its fault (``fl.faults``): the hostile or broken
replies the server must survive, made from a real training reply.

``simulated_faults`` is a Flower mod around the ClientApp's ``train``.
``before_training`` plays the devices that never answer (``crash`` raises, as a
buggy ClientApp would; ``hang`` sleeps past the round's timeout).
``corrupt_reply`` turns an honest reply into an invalid one (NaN, wrong shapes,
impossible metrics...) or a hostile but valid one (``huge_norm``,
``flip_sign``). Only reached in simulation: real devices refuse a recipe that
asks for faults (``clients.app``).
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from clients.device import device_index, is_real_device
from fl import faults as F
from fl import protocol as P
from fl.data.fleet import FleetSpec


def simulated_faults(msg: Message, context: Context, call_next) -> Message:
    """A Flower mod around ``train``, outermost: a simulated faulty device crashes
    or stalls before it opens its store (as a process that dies or hangs would),
    and corrupts its reply after. Real devices pass straight through (the
    ClientApp refuses a recipe that asks them for faults)."""
    if is_real_device(context):
        return call_next(msg, context)
    recipe, _, fleet = P.parse_round_config(msg.content[P.CONFIG])
    kind = fault_of(recipe, fleet, device_index(context))
    before_training(kind, recipe)
    reply = call_next(msg, context)
    if kind and not reply.has_error():
        corrupt_reply(kind, reply.content, msg)
    return reply


def fault_of(recipe: P.Recipe, fleet: FleetSpec, device: int) -> str:
    """This device's fault kind, or "" (honest)."""
    if not recipe.faults:
        return ""
    kinds = recipe.faults.split(",")
    return F.assignment(recipe.seed, fleet.num_devices, recipe.fault_share, kinds).get(device, "")


def before_training(kind: str, recipe: P.Recipe) -> None:
    if kind == "crash":
        raise RuntimeError("simulated fault: this device's ClientApp crashed (faults.kinds)")
    if kind == "hang":
        time.sleep(recipe.fault_hang_seconds)


def corrupt_reply(kind: str, content: RecordDict, sent: Message) -> RecordDict:
    """``content`` (an honest training reply) as the faulty device sends it."""
    metrics = content[P.METRICS]
    if kind == "bad_metrics":
        metrics[P.PHOTO_EPS] = -1.0
        metrics[P.PARTICIPATIONS] = 2.5
    elif kind == "claimed_examples":
        metrics[P.WEIGHT_KEY] = 10**9
    if P.ARRAYS not in content or kind not in (*F.INVALID, *F.HOSTILE):
        return content
    arrays = content[P.ARRAYS].to_torch_state_dict()
    reference = sent.content[P.ARRAYS].to_torch_state_dict()
    first = next(k for k, v in arrays.items() if v.is_floating_point())
    if kind in ("nan", "inf"):
        arrays[first] = arrays[first].clone()
        arrays[first].view(-1)[0] = float(kind)
    elif kind == "wrong_shape":
        arrays[first] = arrays[first].reshape(-1)[:-1].clone()
    elif kind == "missing_key":
        del arrays[first]
    elif kind == "extra_key":
        arrays["fault.extra"] = torch.zeros(1)
    elif kind in F.HOSTILE:
        factor = F.HUGE_FACTOR if kind == "huge_norm" else -F.FLIP_FACTOR
        arrays = {k: (reference[k] + factor * (v - reference[k])).to(v.dtype)
                  if v.is_floating_point() else v for k, v in arrays.items()}
    content[P.ARRAYS] = ArrayRecord(arrays)
    return content
