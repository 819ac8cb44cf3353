"""Who is in the fleet: wait for the devices, then ask each which device it is.

Flower draws node ids at random per run. The roll call maps them to stable device
indices, which the seeded sampling, the evaluation panel and the pseudonymous
ledger rows rely on, so that runs with different settings see the same users.
"""

from __future__ import annotations

import time

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl import protocol as P


def wait_for_nodes(grid: Grid, expected: int, timeout: float = 120.0) -> list[int]:
    start = time.time()
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.time() - start > timeout:
            raise RuntimeError(
                f"only {len(nodes)} of fleet.num_devices={expected} devices connected after "
                f"{timeout:.0f}s; start more SuperNodes or lower fleet.num_devices")
        time.sleep(0.2)
    return nodes


def roll_call(grid: Grid, nodes: list[int], timeout: float) -> dict[int, int]:
    """Node id -> device index, in device-index order.

    Flower draws node ids at random per run; ordering by device index makes the
    seeded sampling and evaluation panel pick the same users in every run, so
    runs with different settings are compared on the same people.
    """
    messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                for n in nodes]
    index = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"device {reply.metadata.src_node_id} did not answer the roll "
                               f"call: {reply.error.reason}")
        index[reply.metadata.src_node_id] = int(reply.content[P.METRICS][P.DEVICE_INDEX])
    if len(index) != len(nodes):
        raise RuntimeError(f"{len(nodes) - len(index)} devices did not answer the roll call")
    return dict(sorted(index.items(), key=lambda item: item[1]))
