"""The device's side of secure aggregation (``aggregation.secure``), as Flower
handlers around the pure protocol of ``fl.secagg.device``.

* ``setup``, ``share_keys``, ``unmask``: query handlers the ClientApp registers
  under ``query.secagg_*`` (``clients.app``);
* ``masked_training``: a mod around ``train``. A training message that carries the
  SecAgg record first hands the forwarded shares to the protocol (which decrypts
  and checks them), then trains as usual, then replaces the shared weights in the
  reply by the masked vector: the update minus the weights sent, over the summed
  arrays, clipped to C, quantized, masked. The weights never leave in the clear.

The protocol state (key pairs, the mask seed, the shares others sent) lives in
the device's Flower context (``context.state``), which stays on the device (the
SuperNode) and is never sent. A refusal (``fl.secagg.device.Refused``) answers a
query with the reason, and turns a training message into an error reply before
training: the server counts the device as dropped, and nothing of its photos
was used.

A device whose node config sets ``require-secure-aggregation=true`` refuses a
training message without the SecAgg record (the server turned it off) with the
reason, before training: the server alone decides ``aggregation.secure``.

Trust: this protects a device's update against an honest-but-curious server only.
Devices cannot authenticate each other's public keys (no PKI of device keys) and
there is no consistency-check round, so a server that substitutes keys or sends
devices different survivor lists (split views) can read one device's update; the
checks of ``fl.secagg.device`` catch accidents, not that (docs/privacy.md).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl import protocol as P
from fl.secagg import device as D
from fl.secagg import params as S

log = logging.getLogger(__name__)

# Node config key (set by the device's owner when starting the SuperNode; the
# server cannot set it): true = train only under secure aggregation.
REQUIRE_KEY = "require-secure-aggregation"
PLAIN_REFUSAL = ("refused: this device's node config sets require-secure-aggregation=true "
                 "and the server asked for its update without secure aggregation; run with "
                 "aggregation.secure=true")


def plain_refusal(context: Context, msg: Message) -> str:
    """Why this device will not train for ``msg`` ("" if it will): its owner insists
    on secure aggregation and the message has no SecAgg record. A value of the key
    other than true/false refuses too (the owner meant something; never guess
    plain)."""
    value = context.node_config.get(REQUIRE_KEY, False)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if not isinstance(value, bool):
        return (f"refused: node config {REQUIRE_KEY}={value!r} is not true or false; "
                "restart the SuperNode with true or false")
    return PLAIN_REFUSAL if value and S.RECORD not in msg.content else ""


def _session(context: Context, round_: object) -> D.Session:
    if S.STATE not in context.state:
        raise D.Refused("no SecAgg session: setup first")
    session = D.Session.from_record(context.state[S.STATE])
    if round_ != session.params.round:
        raise D.Refused(f"a request for round {round_!r} in the session of round "
                        f"{session.params.round}")
    return session


def _save(context: Context, session: D.Session) -> None:
    context.state[S.STATE] = ConfigRecord(session.to_record())


def _answer(msg: Message, stage: str, values: dict) -> Message:
    return Message(content=RecordDict({S.RECORD: ConfigRecord({S.STAGE: stage} | values)}),
                   reply_to=msg)


def _request(msg: Message):
    if S.RECORD not in msg.content:
        raise D.Refused("no SecAgg record in the request")
    return msg.content[S.RECORD]


def setup(msg: Message, context: Context) -> Message:
    try:
        params = S.Params.from_record(_request(msg))
        session, reply = D.setup(int(context.node_id), params)
    except (D.Refused, ValueError) as err:
        return _answer(msg, S.SETUP, {S.REASON: str(err)})
    _save(context, session)
    return _answer(msg, S.SETUP, reply)


def share_keys(msg: Message, context: Context) -> Message:
    try:
        record = _request(msg)
        session = _session(context, record.get(S.ROUND))
        lists = [record.get(k) for k in (S.NEIGHBOURS, S.NEIGHBOUR_PK1, S.NEIGHBOUR_PK2)]
        if not all(isinstance(v, list) for v in lists):
            raise D.Refused("share_keys: neighbour lists missing")
        reply = D.share_keys(session, *lists)
    except D.Refused as err:
        return _answer(msg, S.SHARE_KEYS, {S.REASON: str(err)})
    _save(context, session)
    return _answer(msg, S.SHARE_KEYS, reply)


def unmask(msg: Message, context: Context) -> Message:
    try:
        record = _request(msg)
        session = _session(context, record.get(S.ROUND))
        active, dead = record.get(S.ACTIVE), record.get(S.DEAD)
        if not isinstance(active, list) or not isinstance(dead, list):
            raise D.Refused("unmask: survivor lists missing")
        reply = D.unmask(session, active, dead)
    except D.Refused as err:
        return _answer(msg, S.UNMASK, {S.REASON: str(err)})
    _save(context, session)
    return _answer(msg, S.UNMASK, reply)


def update_vector(sent: dict, trained: dict, keys: tuple[str, ...]) -> np.ndarray:
    """The update over the summed arrays, flattened in order (float64)."""
    return np.concatenate([
        (trained[k].detach().double() - sent[k].detach().double()).reshape(-1).numpy()
        for k in keys]) if keys else np.zeros(0)


def masked_training(msg: Message, context: Context, call_next) -> Message:
    """A Flower mod around ``train`` (innermost): plain messages pass through."""
    if S.RECORD not in msg.content:
        return call_next(msg, context)
    record = msg.content[S.RECORD]
    session = _session(context, record.get(S.ROUND))
    sources, ciphertexts = record.get(S.SOURCES), record.get(S.CIPHERTEXTS)
    if not isinstance(sources, list) or not isinstance(ciphertexts, list):
        raise D.Refused("train: forwarded shares missing")
    D.receive_shares(session, sources, ciphertexts)  # Refused: an error reply, no training
    _save(context, session)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    vector = None
    if P.ARRAYS in reply.content:
        trained = reply.content[P.ARRAYS].to_torch_state_dict()
        sent = msg.content[P.ARRAYS].to_torch_state_dict()
        del reply.content[P.ARRAYS]  # the update leaves only masked
        vector = D.mask(session, update_vector(sent, trained, session.params.keys))
    if vector is not None:
        reply.content[S.MASKED] = ArrayRecord({S.MASKED: Array(vector.astype(np.int64))})
    reply.content[S.RECORD] = ConfigRecord({S.STAGE: S.TRAIN})
    return reply
