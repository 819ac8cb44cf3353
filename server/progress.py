"""Where a run stands: round r of R, devices done in the round, elapsed, time left.

A round of a real fleet can take minutes, so the researcher sees devices finish
as they reply: on a terminal one line is redrawn in place; in a log file (CI,
nohup, a Hydra sweep) a line is written at most every ``quiet_seconds`` so logs
stay readable. The estimate of the time left is the mean round time so far
(of this session, when resumed) times the rounds to go.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from fl.console import say


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``: readable at a glance."""
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    def __init__(self, rounds: int, write: Callable[[str], None] = say,
                 live: bool | None = None, quiet_seconds: float = 30.0) -> None:
        self.rounds, self.write = rounds, write
        self.live = sys.stdout.isatty() if live is None else live
        self.quiet_seconds = quiet_seconds
        self.start = self.round_start = self.last_line = time.time()
        self.first_round, self.round = 1, 0

    def begin(self, first_round: int) -> None:
        self.start, self.first_round = time.time(), first_round

    def round_started(self, rnd: int, sampled: int) -> None:
        self.round, self.round_start = rnd, time.time()
        self.last_line = self.round_start

    def devices(self, step: str, done: int, total: int) -> None:
        now = time.time()
        line = (f"  round {self.round}/{self.rounds}: {done}/{total} devices {step}, "
                f"{duration(now - self.round_start)} into the round")
        if self.live:
            sys.stdout.write("\r" + line.ljust(78))
            sys.stdout.flush()
        elif now - self.last_line >= self.quiet_seconds:
            self.write(line)
            self.last_line = now

    def round_finished(self) -> None:
        if self.live:
            sys.stdout.write("\r" + " " * 78 + "\r")
            sys.stdout.flush()

    def timing(self, rnd: int) -> str:
        """``elapsed 2m10s, ~6m30s left`` after round ``rnd``."""
        elapsed = time.time() - self.start
        done = rnd - self.first_round + 1
        if done <= 0:
            return f"elapsed {duration(elapsed)}"
        left = elapsed / done * (self.rounds - rnd)
        return f"elapsed {duration(elapsed)}, ~{duration(left)} left"
