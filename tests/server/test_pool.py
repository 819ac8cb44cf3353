"""``server.pool.PoolGrid`` on a small ClientApp of its own: what Flower's engine
guarantees a ClientApp and a ServerApp, the pool keeps."""

from __future__ import annotations

import os
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from server.pool import NODE_ID_BASE, PoolGrid


def _app() -> ClientApp:
    """Counts its messages in the node's Context; raises or dies when told to."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        action = msg.content["config"]["action"]
        if action == "raise":
            raise RuntimeError("this device's ClientApp failed")
        if action == "die":
            os._exit(1)  # a worker killed mid-message (out of memory, a signal)
        seen = context.state["seen"]["count"] + 1 if "seen" in context.state else 1
        context.state["seen"] = ConfigRecord({"count": seen})
        reply = {"seen": seen, "partition": context.node_config["partition-id"],
                 "pid": os.getpid()}
        return Message(RecordDict({"config": ConfigRecord(reply)}), reply_to=msg)

    return app


def _message(node: int, action: str = "count") -> Message:
    return Message(RecordDict({"config": ConfigRecord({"action": action})}), node,
                   MessageType.TRAIN)


def _pull_all(grid: PoolGrid, ids: list[str], timeout: float = 120.0) -> list[Message]:
    replies, deadline = [], time.time() + timeout
    while len(replies) < len(ids) and time.time() < deadline:
        replies += grid.pull_messages(ids)
        time.sleep(0.01)
    return replies


def test_a_pool_keeps_each_devices_context_and_tells_devices_apart():
    with PoolGrid(_app(), num_devices=5, workers=2) as grid:
        assert grid.engine_partitions(0) == {NODE_ID_BASE + i: i for i in range(5)}
        assert list(grid.get_node_ids()) == [NODE_ID_BASE + i for i in range(5)]
        for count in (1, 2, 3):  # three rounds to devices 1 and 3, on whichever worker
            replies = grid.send_and_receive([_message(NODE_ID_BASE + 1),
                                             _message(NODE_ID_BASE + 3)], timeout=120)
            got = {r.metadata.src_node_id: dict(r.content["config"]) for r in replies}
            assert {n: (c["seen"], c["partition"]) for n, c in got.items()} == {
                NODE_ID_BASE + 1: (count, 1), NODE_ID_BASE + 3: (count, 3)}
        assert len({c["pid"] for c in got.values()} | {os.getpid()}) >= 2  # not this process
        assert grid.pull_messages(["no-such-message"]) == []


def test_a_failing_or_dying_device_is_an_error_reply_and_the_pool_goes_on():
    with PoolGrid(_app(), num_devices=3, workers=2) as grid:
        raised = grid.send_and_receive([_message(NODE_ID_BASE, "raise")], timeout=120)
        assert raised[0].has_error() and "this device's ClientApp failed" in \
            raised[0].error.reason
        died = _pull_all(grid, list(grid.push_messages([_message(NODE_ID_BASE + 1, "die")])))
        assert len(died) == 1 and died[0].has_error()
        after = grid.send_and_receive([_message(NODE_ID_BASE + 2)], timeout=120)
        assert not after[0].has_error() and after[0].content["config"]["seen"] == 1
