"""Every simulated fault, acted out on a real reply, against the server's checks.

The device side (``clients.faults``) turns an honest training reply into each
fault; the server side (``TrainReport.from_message`` and the release's screen)
must reject exactly the invalid ones, and the release must bound the hostile
ones that pass (``huge_norm``, ``flip_sign``). The e2e version, with crashes
and hangs in a real simulation, is tests/server/test_faults_e2e.py.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message

from clients.faults import before_training, corrupt_reply, fault_of
from fl import faults as F
from fl import protocol as P
from fl.data.fleet import FleetSpec
from fl.privacy.release import DeviceUpdate, PlainRelease, screen
from server.records import DeviceRecord, parse_train_replies
from tests.privacy.replies import train_reply
from tests.server.test_records import GOOD

SENT = {"w": torch.linspace(-1, 1, 6).reshape(2, 3), "b": torch.zeros(3)}


def _honest(node: int) -> Message:
    trained = {k: v + 0.01 for k, v in SENT.items()}
    reply = train_reply(node, trained, examples=12)
    for key, value in GOOD.items():
        reply.content[P.METRICS][key] = value
    return reply


def _acted_out(kind: str, node: int) -> Message:
    reply = _honest(node)
    sent = train_reply(0, SENT)  # the server's message: only its weights are read
    corrupted = corrupt_reply(kind, reply.content, sent)
    return Message(metadata=reply.metadata, content=corrupted)


def test_every_kind_appears_and_the_assignment_is_the_seeds_alone():
    kinds = list(F.KINDS)
    first = F.assignment(0, 14, 0.8, kinds)
    assert len(first) == 11 and sorted(first.values()) == sorted(kinds)
    assert first == F.assignment(0, 14, 0.8, kinds) != F.assignment(1, 14, 0.8, kinds)
    assert F.assignment(0, 14, 0.0, kinds) == {} == F.assignment(0, 14, 0.5, [])
    recipe = P.Recipe(faults=",".join(kinds), fault_share=0.8)
    spec = FleetSpec(num_devices=14)
    assert {d: fault_of(recipe, spec, d) for d in first} == first
    assert fault_of(P.Recipe(), spec, next(iter(first))) == ""


def test_the_server_rejects_exactly_the_invalid_faults_and_bounds_the_rest():
    kinds = list(F.KINDS)
    replies = [_acted_out(kind, node) for node, kind in enumerate(kinds, start=1)
               if kind not in F.ABSENT] + [_honest(99)]
    nodes = [r.metadata.src_node_id for r in replies]
    records = {n: DeviceRecord(f"device-{n:05d}") for n in nodes}
    reports, failed, malformed = parse_train_replies(replies, nodes, records, max_examples=40)
    _, rejected = screen([DeviceUpdate(n, r.arrays, r.examples, m)
                          for n, (r, m) in reports.items()], SENT)
    kind_of = dict(zip(range(1, len(kinds) + 1), kinds))
    refused = {kind_of[n] for n in {**malformed, **rejected}}
    assert refused == set(F.INVALID), (malformed, rejected)
    assert failed == {}
    passed = {kind_of.get(n, "honest") for n in reports if n not in rejected}
    assert passed == {*F.HOSTILE, "honest"}


def test_a_bounded_release_keeps_hostile_updates_to_the_bound():
    """huge_norm and flip_sign pass every check; strategy.update_norm_bound (or
    the user-level clip) is what limits them."""
    from flwr.serverapp.strategy import FedAvg

    updates = []
    for node, kind in enumerate(F.HOSTILE, start=1):
        reply = _acted_out(kind, node)
        arrays = reply.content[P.ARRAYS].to_torch_state_dict()
        updates.append(DeviceUpdate(node, arrays, 12.0, reply))
    unbounded = PlainRelease(FedAvg(weighted_by_key=P.WEIGHT_KEY)).release(1, SENT, updates)
    bounded = PlainRelease(FedAvg(weighted_by_key=P.WEIGHT_KEY), norm_bound=0.1).release(
        1, SENT, updates)

    def moved(state):
        return float(torch.sqrt(sum(((state[k] - SENT[k]) ** 2).sum() for k in SENT)))

    assert moved(unbounded.state) > 1e3 and moved(bounded.state) <= 0.1 + 1e-6


def test_crash_raises_and_hang_outlasts_the_timeout():
    with pytest.raises(RuntimeError, match="simulated fault"):
        before_training("crash", P.Recipe())
    import time

    start = time.time()
    before_training("hang", P.Recipe(fault_hang_seconds=0.3))
    assert time.time() - start >= 0.3
