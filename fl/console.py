"""fedface's console output: one flushed line at a time, so progress shows up
promptly even when stdout is a file or a pipe (CI logs, nohup, tee)."""

from __future__ import annotations


def say(line: str) -> None:
    print(line, flush=True)
