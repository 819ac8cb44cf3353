"""``fleet.backend=pool``: a simulation backend of long-lived worker processes.

Why a second backend: Flower's Simulation Engine moves every message through its
in-memory LinkState, a pump thread that visits every node every 0.1 s, a queue,
and a Ray actor; a reply waits for the server's next poll. With a round of ten
devices on two cores, those waits leave the workers idle for a third of the
round (docs/results.md, "Scale"). pfl-research avoids them by training each
worker's users one after another in long-lived processes; this is that design
behind the *same* apps:

* the ServerApp's loop (``server.app.run_experiment``) gets a ``PoolGrid``, a
  Flower ``Grid`` whose messages go straight to a process pool;
* each worker imports the ClientApp once (fedface's ``clients.app.app`` with its
  mods, or the audit's) and calls it on every message it is handed, exactly as a
  SuperNode or a Ray actor does: one code path for devices;
* a node's ``Context`` lives here, in the server's process, and travels with each
  message and back, as in Flower's engine (SecAgg+ keeps its secrets in it
  between stages);
* a reply is ready for ``pull_messages`` the moment its worker returns it.

What it gives up: Ray's cluster (``fleet.ray_address``) and its GPU shares
(``fleet.gpus_per_device``); a pool is one machine's cores
(the cores this process may use / ``fleet.cpus_per_device`` workers). Node ids
are ``2**32 +`` the device index, known without asking (``engine_partitions``), as
the engine's are. A worker that dies (killed, out of memory) takes the pool with it:
every message then in flight comes back as an error reply (those devices fail the
round, as when a machine of Flower's engine goes down) and a fresh pool takes the
next ones.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_for
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Self

import cloudpickle
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

NODE_ID_BASE = 1 << 32  # node id = NODE_ID_BASE + device index: never the server's id

_APP = None  # in a worker: the ClientApp, unpickled once


def _start_worker(app_bytes: bytes, threads: int) -> None:
    """Each worker: one torch thread per simulated device (as Ray's actors get),
    and the ClientApp, imported once for every message the worker handles."""
    global _APP
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    _APP = cloudpickle.loads(app_bytes)


def _handle(message: Message, context: Context) -> tuple[Message, Context]:
    """One message on one device, in a worker. An exception becomes an error reply,
    as Flower's engine makes it."""
    try:
        return _APP(message, context), context
    except Exception as err:  # noqa: BLE001 - the server sees a failed device, not a crash
        return _error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, err), context


def _error_reply(message: Message, code: int, err: BaseException) -> Message:
    return Message(Error(code=code, reason=f"{type(err)}:<'{err}'>"), reply_to=message)


@dataclass(frozen=True)
class _Sent:
    message: Message
    future: Future
    node: int
    sequence: int  # order of pushing: the newest pulled message's Context is kept


class PoolGrid(Grid):
    """A Flower ``Grid`` over a process pool; use as a context manager."""

    def __init__(self, app, num_devices: int, workers: int, threads: int = 1,
                 run_id: int = 1) -> None:
        self.run_id, self.workers, self.num_devices = run_id, workers, num_devices
        # A node's Context is made when it is first sent a message: the pool keeps one
        # per device that took part, not one per device of a 100,000-device fleet.
        self._contexts: dict[int, Context] = {}
        self._start = (workers, cloudpickle.dumps(app), threads)
        self._pool = self._new_pool()
        self._pending: dict[str, _Sent] = {}
        self._kept: dict[int, int] = {}  # node -> sequence number of the Context kept
        self._sequence = itertools.count(1)
        self._lock = threading.Lock()
        self._run = None

    def __enter__(self) -> Self:
        # Messages the server's strategy builds take their run and sender from
        # Flower's task identity, which Flower's own runtimes set (as its legacy
        # ``start_grid`` does for a grid it did not start).
        TaskIdentity.task_id, TaskIdentity.run_id = 1, self.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        return self

    def __exit__(self, *exc) -> None:
        self._stop_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server's process has threads (MLflow, the loop) and
        # torch's thread pools, which a fork would copy mid-use.
        workers, app_bytes, threads = self._start
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(app_bytes, threads))

    def _stop_pool(self) -> None:
        """Stop the workers now, even one still inside a device that hangs
        (``faults.kinds=[hang]``) or past its round's timeout: Flower's engine
        terminates its actors the same way at the end of a simulation."""
        processes = list(getattr(self._pool, "_processes", {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)

    def _submit(self, message: Message, context: Context) -> Future:
        """Hand a message to a worker. A worker that died breaks a
        ``ProcessPoolExecutor`` for good (every future then pending fails): a fresh
        pool takes this message and the next ones."""
        try:
            return self._pool.submit(_handle, message, context)
        except BrokenProcessPool:
            self._stop_pool()
            self._pool = self._new_pool()
            return self._pool.submit(_handle, message, context)

    # --- what fedface's loop uses --------------------------------------------------

    def engine_partitions(self, timeout: float) -> dict[int, int]:
        """Node id -> device index, as ``server.engine_nodes`` offers the engine's."""
        return {NODE_ID_BASE + index: index for index in range(self.num_devices)}

    def get_node_ids(self) -> Iterable[int]:
        return range(NODE_ID_BASE, NODE_ID_BASE + self.num_devices)

    def _context(self, node: int) -> Context:
        index = node - NODE_ID_BASE
        if not 0 <= index < self.num_devices:
            raise ValueError(f"no node {node} in this pool of {self.num_devices} devices")
        if node not in self._contexts:
            self._contexts[node] = Context(
                run_id=self.run_id, node_id=node, state=RecordDict(), run_config={},
                node_config={"partition-id": index, "num-partitions": self.num_devices})
        return self._contexts[node]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        with self._lock:
            self._drop_expired(time.time())
            for message in messages:
                node = message.metadata.dst_node_id
                message_id = str(uuid.uuid4())
                message.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do
                future = self._submit(message, self._context(node))
                self._pending[message_id] = _Sent(message, future, node, next(self._sequence))
                ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that have come, at once. A node's Context is kept from the
        newest message pulled (never from one pushed earlier that finished later),
        before its reply is returned, so the next message to that node carries it.
        A worker that died answers with an error reply (the device failed this
        round), never an exception here."""
        replies = []
        with self._lock:
            done = [m for m in message_ids if m in self._pending and self._pending[m].future.done()]
            for sent in (self._pending.pop(m) for m in done):
                future = sent.future
                error = CancelledError() if future.cancelled() else future.exception()
                if error is not None:
                    reply = _error_reply(sent.message, ErrorCode.UNKNOWN, error)
                else:
                    reply, context = future.result()
                    if sent.sequence > self._kept.get(sent.node, 0):
                        self._contexts[sent.node], self._kept[sent.node] = context, sent.sequence
                reply.metadata.__dict__["_message_id"] = f"reply-{sent.message.metadata.message_id}"
                replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        with self._lock:
            futures = [self._pending[m].future for m in ids]
        wait_for(futures, timeout=timeout)
        return self.pull_messages(ids)

    def _drop_expired(self, now: float) -> None:
        """Messages past their time to live (``created_at + ttl``, as Flower's
        LinkState drops them): not started, cancelled; finished, forgotten, so a
        reply nobody will pull does not hold its weights for the rest of the run."""
        for message_id, sent in list(self._pending.items()):
            metadata = sent.message.metadata
            if metadata.created_at + metadata.ttl < now:
                sent.future.cancel()
                del self._pending[message_id]

    # --- the rest of Flower's Grid --------------------------------------------------

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)
