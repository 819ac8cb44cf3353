"""In simulation, which node is which device: read from Flower's engine, never asked.

Flower's Simulation Engine registers its N nodes in one call
(``flwr.server.superlink.fleet.vce.vce_api._register_nodes``) that returns the
mapping node id -> partition id, and gives each node that partition id as
``node_config["partition-id"]``: the device index the ClientApp trains as
(``clients.device.device_index``). Flower 1.41 has no public way to hand that
mapping to the ServerApp. The roll call (``server.roll_call``) learnt it by asking
every node, one message per device, which costs O(N) messages and, with Flower's
in-memory state scanning every pending message for every node, about 36 ms per
message at 10,000 devices (204 s to start).

``recording_engine_nodes`` records the mapping as the engine makes it, for the
duration of one ``run_simulation`` call, and ``EngineGrid`` offers it to the
ServerApp on its grid (``engine_partitions``). A Flower version without that
function is caught: the grid then offers nothing and the loop falls back to the
roll call, which works with any Flower. Only ``server.simulation`` uses this.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.serverapp import Grid

_ONE_AT_A_TIME = threading.Lock()  # the hook is process-wide: one simulation at a time


class EngineNodes:
    """The engine's node id -> partition id, once it has registered the nodes."""

    def __init__(self, hooked: bool) -> None:
        self.hooked = hooked  # False: this Flower has no hook; nobody will record
        self._mapping: dict[int, int] = {}
        self._ready = threading.Event()
        self.pumping = threading.Event()  # the engine's workers are up, messages flow

    def record(self, mapping: dict[int, int]) -> None:
        self._mapping = dict(mapping)
        self._ready.set()

    def wait(self, timeout: float) -> dict[int, int] | None:
        """The mapping (a copy), or None if it is not known within ``timeout``."""
        if not self.hooked or not self._ready.wait(timeout):
            return None
        # The roll call's first message used to wait (60 s) for Ray's workers to
        # come up; without it, wait here, so no round's timeout pays for it.
        self.pumping.wait(timeout)
        return dict(self._mapping)


@contextmanager
def recording_engine_nodes() -> Iterator[EngineNodes]:
    """Record the nodes the Simulation Engine registers while the block runs."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:  # pragma: no cover - another Flower layout: the roll call serves
        yield EngineNodes(hooked=False)
        return
    register = getattr(vce_api, "_register_nodes", None)
    if register is None:  # pragma: no cover - as above
        yield EngineNodes(hooked=False)
        return
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        raise RuntimeError("another simulation is running in this process; fedface runs "
                           "one Flower simulation per process at a time")
    nodes = EngineNodes(hooked=True)

    def registering(*args, **kwargs):
        mapping = register(*args, **kwargs)
        nodes.record(mapping)
        return mapping

    pump = getattr(vce_api, "add_messages_to_queue", None)

    def pumping(*args, **kwargs):  # started once the backend's workers are built
        nodes.pumping.set()
        return pump(*args, **kwargs)

    vce_api._register_nodes = registering
    if pump is None:
        nodes.pumping.set()
    else:
        vce_api.add_messages_to_queue = pumping
    try:
        yield nodes
    finally:
        vce_api._register_nodes = register
        if pump is not None:
            vce_api.add_messages_to_queue = pump
        _ONE_AT_A_TIME.release()


class EngineGrid:
    """Flower's grid, plus the engine's node -> device index (``engine_partitions``).

    Everything else is the wrapped grid's. Observers (``simulate(wrap_grid=...)``)
    wrap this one, and reach ``engine_partitions`` through their own forwarding."""

    def __init__(self, grid: Grid, nodes: EngineNodes) -> None:
        self._grid, self._nodes = grid, nodes

    def engine_partitions(self, timeout: float) -> dict[int, int] | None:
        return self._nodes.wait(timeout)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
