"""Who is in the fleet: node id -> device index, once per session.

Flower draws node ids at random per run. The loop maps them to stable device
indices, which the seeded sampling, the evaluation panel and the pseudonymous
ledger rows rely on, so that runs with different settings see the same users.
Two ways (``learn_indices`` picks):

* **simulation**: the Simulation Engine itself numbered the nodes (the
  ``partition-id`` each ClientApp trains as); ``server.engine_nodes`` hands that
  mapping to the grid, and ``from_engine`` reads it. No message is sent, so
  start-up does not grow with the fleet (one message per device cost 204 s at
  10,000 devices).
* **deployment** (or a Flower without the engine hook): the roll call below
  waits for the devices, then asks each which device it is.

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


def learn_indices(grid: Grid, num_devices: int, needed: int, timeout: float,
                  log: Callable[[str], None] = print) -> RollCall:
    """From the simulation engine if the grid offers it (``engine_partitions``),
    otherwise by the roll call."""
    offered = getattr(grid, "engine_partitions", None)
    partitions = offered(CONNECT_TIMEOUT) if callable(offered) else None
    if partitions is not None:
        return from_engine(grid, partitions, num_devices, needed, log)
    return roll_call(grid, wait_for_nodes(grid, num_devices, needed), num_devices, needed,
                     timeout, log)


def from_engine(grid: Grid, partitions: dict[int, int], num_devices: int, needed: int,
                log: Callable[[str], None] = print) -> RollCall:
    """The simulation's own node id -> partition id, for the nodes connected now.

    The engine registers exactly ``fleet.num_devices`` nodes numbered 0..N-1; any
    other mapping is not this fleet's and stops the run. A registered node that
    the grid does not list is absent from this session, as a device that missed
    the roll call would be."""
    devices = sorted(partitions.values())
    if devices != list(range(num_devices)):
        raise RuntimeError(
            f"the simulation engine numbered its {len(partitions)} nodes "
            f"{devices[:3]}..{devices[-3:]}, not 0..{num_devices - 1} as "
            f"fleet.num_devices={num_devices} asks: the engine is not running this fleet")
    connected = set(grid.get_node_ids())
    index = {node: device for node, device in sorted(partitions.items(), key=lambda i: i[1])
             if node in connected}
    left_out = {node: "not connected to the simulation" for node in partitions
                if node not in connected}
    for node, why in left_out.items():
        log(f"engine roll call: node {node} (device {partitions[node]}) left out: {why}")
    if len(index) < needed:
        raise RuntimeError(
            f"only {len(index)} of fleet.num_devices={num_devices} simulated devices are "
            f"connected, fewer than the {needed} fleet.start_quorum asks for")
    return RollCall(index, left_out)


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
