"""Getting messages to devices and their replies back, within the round's time.

fedface pushes a round's messages and polls for replies itself
(``push_messages``/``pull_messages``) instead of Flower's blocking
``send_and_receive``, so the console can count devices as they finish; a device
that has not answered by the timeout is simply absent from the replies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fl import protocol as P

# Seconds between polls for device replies: from FIRST_PULL after a push or a
# reply, doubling while nothing comes, up to PULL_INTERVAL. Replies come in
# bursts (a round's devices finish together), so a short wait right after one
# finds the next without making an idle fleet poll the SuperLink every 10 ms.
FIRST_PULL, PULL_INTERVAL = 0.01, 0.25


class PullBackoff:
    """How long to sleep before the next poll: FIRST_PULL after a push or a reply,
    then twice as long after each empty poll, up to ``longest``."""

    def __init__(self, longest: float = PULL_INTERVAL) -> None:
        self.longest, self.wait = longest, FIRST_PULL

    def after(self, got_any: bool) -> None:
        """Sleep before the next poll; ``got_any``: the last poll brought replies."""
        if got_any:
            self.wait = FIRST_PULL
        time.sleep(self.wait)
        self.wait = min(2 * self.wait, self.longest)


class SampledGrid:
    """A grid whose node list is the devices fedface sampled for this step, so a
    Flower strategy's ``configure_*`` addresses exactly them."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid, self._node_ids = grid, [int(n) for n in node_ids]

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class Transport:
    """Sends every message with the public initial personal part attached."""

    def __init__(self, grid: Grid, personal_init: ArrayRecord, timeout: float,
                 on_reply: Callable[[str, int, int], None],
                 first_timeout: float | None = None) -> None:
        self.grid, self.personal_init, self.timeout = grid, personal_init, timeout
        self.on_reply = on_reply  # (step, replies so far, messages sent)
        # A session's first exchange also starts the devices' ClientApps (in
        # simulation: Ray workers importing torch and Opacus; no roll call warms them
        # up there, see server.roll_call): until its first reply it may take this long.
        self.first_timeout = first_timeout

    def send(self, messages: Iterable[Message], step: str) -> list[Message]:
        """Push the messages, then pull replies until all came or the timeout passed."""
        messages = list(messages)
        for message in messages:
            message.content[P.PERSONAL_INIT] = self.personal_init
        waiting = set(self.grid.push_messages(messages))
        total, replies = len(waiting), []
        # The session's first exchange may wait up to ``first_timeout`` for its first
        # reply (the ClientApps are starting, not late); from that reply on, the others
        # get ``timeout`` as usual.
        start, cold_start = time.time(), self.first_timeout or 0.0
        self.first_timeout = None
        deadline = start + max(self.timeout, cold_start)
        backoff = PullBackoff()
        while waiting and time.time() < deadline:
            got = list(self.grid.pull_messages(waiting))
            if got and not replies:
                deadline = min(deadline, max(start, time.time()) + self.timeout)
            replies += got
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            if got:
                self.on_reply(step, len(replies), total)
            if waiting:
                backoff.after(bool(got))
        return replies
