"""What the server knows of each device: its row in the pseudonymous ledger.

A device reports (as scalars) its photo-level ledger, its consent counts and,
when it took no part, a one-line reason. The server folds those replies into
one ``DeviceRecord`` per device and derives the round's fleet, consent and
photo-level metrics from the records. Records are keyed by Flower node id in
memory and by the device's stable index in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from fl import protocol as P
from fl.tracking import keys as K


@dataclass
class DeviceRecord:
    """What the server knows of one device's photo-level ledger (from its replies)."""

    device: str  # pseudonym: "device-<index>", never a path or a person's name
    participations: int = 0
    steps: int = 0
    sample_rate: float = 0.0
    epsilon: float | None = None  # photo-level, as last reported; None: never reported
    status: str = "never sampled"  # | trained | budget exhausted | failed[: why] | not trained: why
    # Consent and data, as last reported (counts only).
    photos_withdrawn: int = 0
    photos_skipped: int = 0
    photos_converted: int = 0
    opted_out: bool = False  # deleted its data, or no photo consented for training
    deleted: bool = False  # the user deleted their data: never sampled again
    excluded: bool = False  # too few usable photos: never sampled again

    @property
    def gone(self) -> bool:
        return self.deleted or self.excluded

    def note(self, m, reason: str) -> None:
        """Fold a reply's consent and data report into the record."""
        self.photos_withdrawn = int(m.get(P.PHOTOS_WITHDRAWN, self.photos_withdrawn))
        self.photos_skipped = int(m.get(P.PHOTOS_SKIPPED, self.photos_skipped))
        self.photos_converted = int(m.get(P.PHOTOS_CONVERTED, self.photos_converted))
        self.opted_out = bool(m.get(P.OPTED_OUT, 0))
        self.deleted = self.deleted or bool(m.get(P.DELETED, 0))
        self.excluded = self.excluded or bool(m.get(P.EXCLUDED, 0))
        if reason:
            self.status = f"not trained: {reason}"


def reason_of(reply: Message) -> str:
    """Why a device took no part, as it said (a short sentence, never photo ids)."""
    return str(reply.content[P.STATUS][P.REASON]) if P.STATUS in reply.content else ""


def fleet_consent(records) -> dict[str, float]:
    """Consent and data metrics over everything devices have reported so far."""
    records = list(records)
    return {
        K.CONSENT_PHOTOS_REVOKED: float(sum(r.photos_withdrawn for r in records)),
        K.CONSENT_DEVICES_OPTED_OUT: float(sum(r.opted_out for r in records)),
        K.DATA_PHOTOS_SKIPPED: float(sum(r.photos_skipped for r in records)),
        K.DATA_PHOTOS_CONVERTED: float(sum(r.photos_converted for r in records)),
        K.DATA_DEVICES_EXCLUDED: float(sum(r.excluded for r in records)),
    }


def photo_metrics(records) -> dict[str, float]:
    """Photo-level epsilon over every device that has reported one."""
    eps = [r.epsilon for r in records if r.epsilon is not None] or [0.0]
    return {K.PHOTO_EPS_MAX: float(np.max(eps)), K.PHOTO_EPS_MEAN: float(np.mean(eps)),
            K.PHOTO_EPS_P95: float(np.percentile(eps, 95))}


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def fold_train_replies(records: dict[int, DeviceRecord], replies: list[Message],
                       exhausted: set[int]) -> tuple[list[Message], list[float], int]:
    """Fold a training round's replies into ``records`` (and ``exhausted``).

    Returns (replies carrying an update, training losses, photos used).
    """
    updates, losses, photos_used = [], [], 0
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            if node in records:
                records[node].status = "failed"
            continue
        m = reply.content[P.METRICS]
        record = records[node]
        record.participations = int(m[P.PARTICIPATIONS])
        record.steps = int(m[P.LEDGER_STEPS])
        record.sample_rate = float(m[P.SAMPLE_RATE]) or record.sample_rate
        record.epsilon = float(m[P.PHOTO_EPS])
        record.status = "trained"
        record.note(m, reason_of(reply))
        if int(m[P.BUDGET_EXHAUSTED]):
            exhausted.add(node)
            record.status = "budget exhausted"
        if int(m[P.TRAINED]):
            losses.append(float(m[P.TRAIN_LOSS]))
            photos_used += int(m[P.PHOTOS_USED])
        if P.ARRAYS in reply.content:
            updates.append(reply)
    return updates, losses, photos_used


def newer_state(records: dict[int, DeviceRecord], replies: list[Message]) -> tuple[str, int]:
    """(device, round) of a device that already holds state of a later round of
    this run than the one it was asked to train, or ("", 0)."""
    for reply in replies:
        if not reply.has_error() and P.NEWER_STATE_ROUND in reply.content[P.METRICS]:
            node = reply.metadata.src_node_id
            return records[node].device, int(reply.content[P.METRICS][P.NEWER_STATE_ROUND])
    return "", 0
