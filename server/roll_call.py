"""Who is in the fleet: wait for the devices, then ask each which device it is.

Flower draws node ids at random per run. The roll call maps them to stable device
indices, which the seeded sampling, the evaluation panel and the pseudonymous
ledger rows rely on, so that runs with different settings see the same users.

A device that errors, is slow, or claims an index outside the fleet is left
out of this session and logged, and so is every node claiming an index another
node claims too (which of them is the device cannot be told here: with
``--enable-supernode-auth`` only registered keys can claim at all); the run starts when at least
``fleet.start_quorum`` of ``fleet.num_devices`` answered. Devices left out are
absent, not removed: they keep their place in the fleet (the sampling still
draws from all N, so nobody's sampling rate rises) and take part again in a
later session (a resume).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl import protocol as P

CONNECT_TIMEOUT = 120.0  # seconds to wait for every device to connect before a quorum will do
# At least this long for the answers (or fleet.round_timeout if longer): the first
# message to a device also starts its ClientApp process.
ROLL_CALL_TIMEOUT = 60.0


@dataclass
class RollCall:
    index: dict[int, int]  # node id -> device index, in device-index order
    left_out: dict[int, str] = field(default_factory=dict)  # node id -> why, for the log


def quorum(num_devices: int, share: float) -> int:
    return max(1, math.ceil(share * num_devices - 1e-9))


def wait_for_nodes(grid: Grid, expected: int, needed: int,
                   timeout: float = CONNECT_TIMEOUT) -> list[int]:
    """Every expected node, or after ``timeout`` at least ``needed`` of them."""
    start = time.time()
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.time() - start > timeout:
            if len(nodes) >= needed:
                return nodes
            raise RuntimeError(
                f"only {len(nodes)} of fleet.num_devices={expected} devices connected after "
                f"{timeout:.0f}s, fewer than the {needed} fleet.start_quorum asks for; start "
                "more SuperNodes, or lower fleet.start_quorum or fleet.num_devices")
        time.sleep(0.2)
    return nodes


def roll_call(grid: Grid, nodes: list[int], num_devices: int, needed: int, timeout: float,
              log: Callable[[str], None] = print) -> RollCall:
    """Ask every connected node its device index; keep the valid, first answers."""
    messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                for n in nodes]
    claims: dict[int, list[int]] = {}  # device index -> nodes claiming it
    left_out: dict[int, str] = {}  # node -> why
    answered: set[int] = set()  # a node's first answer counts (O(1) per reply)
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if node in answered:
            continue
        answered.add(node)
        why, device = _claimed_index(reply, num_devices)
        if why:
            left_out[node] = why
        else:
            claims.setdefault(device, []).append(node)
    index = {}
    for device, claimants in claims.items():
        if len(claimants) == 1:
            index[claimants[0]] = device
        else:  # which one is the device is unknowable here: none of them takes part
            left_out |= {n: f"claims device index {device}, as {len(claimants) - 1} other "
                            "node(s) did" for n in claimants}
    for node in set(nodes) - set(index) - set(left_out):
        left_out[node] = f"did not answer within {timeout:g}s"
    for node, why in left_out.items():
        log(f"roll call: node {node} left out: {why}")
    if len(index) < needed:
        raise RuntimeError(
            f"only {len(index)} of fleet.num_devices={num_devices} devices answered the roll "
            f"call, fewer than the {needed} fleet.start_quorum asks for "
            f"({len(left_out)} left out: see the log)")
    return RollCall(dict(sorted(index.items(), key=lambda item: item[1])), left_out)


def _claimed_index(reply: Message, num_devices: int) -> tuple[str, int]:
    """(why the answer cannot be used or "", the device index it claims)."""
    if reply.has_error():
        return "its ClientApp failed to answer", -1
    try:
        value = reply.content[P.METRICS][P.DEVICE_INDEX]
    except (KeyError, TypeError):
        return "its answer has no device index", -1
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_devices:
        return f"claims device index {value!r}, outside 0..{num_devices - 1}", -1
    return "", int(value)
