"""What the server knows of each device: its row in the pseudonymous ledger.

A device reports (as scalars) its photo-level ledger, its consent counts and,
when it took no part, a one-line reason. The server folds those replies into
one ``DeviceRecord`` per device and derives the round's fleet, consent and
photo-level metrics from the records. Records are keyed by Flower node id in
memory and by the device's stable index in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Collection
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


def parse_train_replies(replies: list[Message], sampled: Collection[int]
                        ) -> tuple[dict[int, tuple[P.TrainReport, Message]], dict[int, str],
                                   dict[int, str]]:
    """Typed reports of the devices asked this round; the devices whose reply was an
    error (failed); and those whose reply failed validation (rejected, with why).

    Replies from devices not asked, and second replies, are dropped: input from a
    device is untrusted."""
    reports, failed, rejected = {}, {}, {}
    asked = set(sampled)
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in asked or node in reports or node in failed or node in rejected:
            continue
        if reply.has_error():
            failed[node] = "failed"
            continue
        try:
            reports[node] = (P.TrainReport.from_message(reply), reply)
        except P.MalformedReply as err:
            rejected[node] = f"rejected: malformed reply ({err})"
    return reports, failed, rejected


def fold_train_reports(records: dict[int, DeviceRecord],
                       reports: dict[int, tuple[P.TrainReport, Message]],
                       failed: dict[int, str], exhausted: set[int]) -> tuple[list[float], int]:
    """Fold a round's reports into ``records`` (and ``exhausted``); ``failed``
    holds the status of devices that erred, sent a malformed reply, or whose
    update the release rejected. Returns the training losses and photos used of
    the updates that counted."""
    losses, photos_used = [], 0
    for node, reason in failed.items():
        records[node].status = reason
    for node, (report, _) in reports.items():
        record = records[node]
        record.participations, record.steps = report.participations, report.ledger_steps
        record.sample_rate = report.sample_rate or record.sample_rate
        record.epsilon = report.photo_eps
        record.status = "trained"
        record.note(report.consent, report.reason)
        if report.budget_exhausted:
            exhausted.add(node)
            record.status = "budget exhausted"
        if node in failed:
            record.status = failed[node]
        elif report.trained and report.arrays is not None:
            if math.isfinite(report.train_loss):
                losses.append(report.train_loss)
            photos_used += report.photos_used
    return losses, photos_used


def newer_state(records: dict[int, DeviceRecord],
                reports: dict[int, tuple[P.TrainReport, Message]], rnd: int,
                rounds: int) -> tuple[str, int]:
    """(device, round) of a device that holds state of a later round of this run
    (one in ``(rnd, rounds]``) than the one it was asked to train, or ("", 0)."""
    for node, (report, _) in reports.items():
        later = report.newer_state_round
        if later is not None and rnd < later <= rounds:
            return records[node].device, later
    return "", 0


def _finite(metrics, name: str) -> bool:
    value = metrics.get(name)
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def fold_evaluate_replies(replies: list[Message], panel: Collection[int]) -> dict[str, float]:
    """Mean quality over the panel devices that answered with finite values."""
    asked = set(panel)
    ok = [r.content[P.METRICS] for r in replies if r.metadata.src_node_id in asked
          and not r.has_error() and P.METRICS in r.content]
    out = {key: mean([float(m[name]) for m in ok if _finite(m, name)])
           for name, key in K.QUALITY.items() if any(_finite(m, name) for m in ok)}
    out[K.DEVICES_EVALUATED_PERSONALISED] = float(sum(m.get(P.PERSONALISED) == 1 for m in ok))
    return out
