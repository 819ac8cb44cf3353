"""A fleet of SecAgg devices behind a fake Grid, in this process (no Ray), for the
benchmark (``experiments.bench.secagg``) and the tests (tests/secagg): real
Flower ``Message`` and ``Context`` objects through the real handlers of
``clients.secagg``, with a stand-in for training (sent weights + a fixed update).

``drop``: {stage: nodes that never answer that stage (the server times out)};
``crash``: {stage: nodes whose ClientApp errs}; ``tamper``: {stage: f(node, reply)}.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from flwr.app import ArrayRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict

from clients import secagg
from fl import protocol as P
from fl.secagg import params as S

STAGE_OF = {"query.secagg_setup": S.SETUP, "query.secagg_share_keys": S.SHARE_KEYS,
            "train": S.TRAIN, "query.secagg_unmask": S.UNMASK}
HANDLERS = {S.SETUP: secagg.setup, S.SHARE_KEYS: secagg.share_keys, S.UNMASK: secagg.unmask}


class FakeFleet:
    def __init__(self, updates: dict[int, dict[str, torch.Tensor] | None], drop=None,
                 crash=None, tamper=None) -> None:
        self.updates = updates
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in updates}
        self.drop, self.crash, self.tamper = drop or {}, crash or {}, tamper or {}
        self.replies: dict[str, Message] = {}
        self.pulled: list[Message] = []
        self.count = 0

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.count += 1
            mid = f"m{self.count}"
            node = int(message.metadata.dst_node_id)
            incoming = Message(metadata=Metadata(
                run_id=1, message_id=mid, src_node_id=0, dst_node_id=node,
                reply_to_message_id="", group_id=message.metadata.group_id,
                created_at=time.time(), ttl=60.0,
                message_type=message.metadata.message_type), content=message.content)
            ids.append(mid)
            stage = STAGE_OF[message.metadata.message_type]
            if node in self.drop.get(stage, ()):
                continue
            if node in self.crash.get(stage, ()):
                self.replies[mid] = Message(error=Error(3, "crashed"), reply_to=incoming)
                continue
            reply = self._handle(stage, incoming, self.contexts[node])
            if stage in self.tamper:
                reply = self.tamper[stage](node, reply)
            self.replies[mid] = reply
        return ids

    def _handle(self, stage, msg, context):
        if stage != S.TRAIN:
            return HANDLERS[stage](msg, context)
        try:
            return secagg.masked_training(msg, context, self._train)
        except Exception as err:  # noqa: BLE001 - as Flower: an error reply
            return Message(error=Error(3, str(err)), reply_to=msg)

    def _train(self, msg, context):
        update = self.updates[int(context.node_id)]
        content = RecordDict({P.METRICS: MetricRecord({P.TRAINED: int(update is not None)})})
        if update is not None:
            sent = msg.content[P.ARRAYS].to_torch_state_dict()
            content[P.ARRAYS] = ArrayRecord({k: v + update.get(k, 0) for k, v in sent.items()})
        return Message(content=content, reply_to=msg)

    def pull_messages(self, message_ids):
        got = [self.replies.pop(m) for m in list(message_ids) if m in self.replies]
        self.pulled += got
        return got


def train_messages(shared: dict[str, torch.Tensor], nodes: list[int]) -> list[Message]:
    """As Flower's strategies build them: one content object shared by all."""
    content = RecordDict({P.ARRAYS: ArrayRecord(shared)})
    return [Message(content=content, dst_node_id=n, message_type="train", group_id="1")
            for n in nodes]


def reports(replies: list[Message]) -> dict:
    """{device: (report, reply)} as the loop hands them on (device = node here)."""
    out = {}
    for reply in replies:
        if reply.has_error():
            continue
        trained = bool(reply.content[P.METRICS][P.TRAINED])
        out[int(reply.metadata.src_node_id)] = (SimpleNamespace(trained=trained), reply)
    return out
