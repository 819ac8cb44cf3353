"""Steps 3 and 5 of a round, plain or secure: the loop's one seam.

``collect`` gets the training replies of the sampled devices; ``release`` turns
the validated reports into the round's release (``fl.privacy.release``).
``PlainAggregation`` sends the strategy's messages and releases from the
individual updates; ``server.secure_aggregation.SecureAggregation``
(``aggregation.secure=true``) runs SecAgg+ around the same training messages and
releases from their unmasked sum only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from flwr.app import Message

from fl.privacy.release import DeviceUpdate, Release, Released
from server.transport import Transport


class Aggregation(Protocol):
    def collect(self, rnd: int, messages: Iterable[Message], devices: dict[int, int]
                ) -> list[Message]:
        """Training replies; ``devices`` maps each message's node id to its device."""

    def release(self, rnd: int, shared: dict[str, torch.Tensor], reports: dict
                ) -> Released:
        """The round's release from ``reports`` ({device: (TrainReport, reply)})."""


class PlainAggregation:
    """The server sees each update (photo-level DP only protects what it holds)."""

    def __init__(self, transport: Transport, release: Release) -> None:
        self.transport, self._release = transport, release

    def collect(self, rnd, messages, devices):
        return self.transport.send(messages, "trained")

    def release(self, rnd, shared, reports):
        return self._release.release(rnd, shared, [
            DeviceUpdate(device, report.arrays, report.examples, reply)
            for device, (report, reply) in reports.items() if report.arrays is not None])


def make_aggregation(secure: bool, transport: Transport, release: Release,
                     num_shares: float = 1.0, threshold: float = 0.75,
                     log: Callable[[str], None] = print,
                     min_survivors: int = 3) -> Aggregation:
    if not secure:
        return PlainAggregation(transport, release)
    from server.secure_aggregation import SecureAggregation

    return SecureAggregation(transport, release, num_shares, threshold, log, min_survivors)
