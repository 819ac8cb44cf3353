"""What the server knows of each device: its row in the pseudonymous ledger.

A device reports (as scalars) its photo-level ledger, its consent counts and,
when it took no part, a one-line reason. The server folds those replies into
one ``DeviceRecord`` per device and derives the round's fleet, consent and
photo-level metrics from the records. Parsing works on Flower node ids (what a
reply carries); the round loop keys records by the device's stable index, in
memory and in the checkpoint.

Only devices that took part (were sampled while present) have a record
(``DeviceRecords``): a device never asked is exactly a fresh record, so the
server's memory, checkpoint and ledger table grow with the devices that took
part, not with the fleet (100,000 devices, 100 a round).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from flwr.app import Message
from flwr.common.constant import ErrorCode

from fl import protocol as P
from fl.secagg import params as S
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
    # Availability: rounds missed in a row (error, crash, timeout), and the last
    # round of a pause after ``fleet.unavailable_after`` misses (0: available).
    missed: int = 0
    unavailable_until: int = 0

    @property
    def gone(self) -> bool:
        return self.deleted or self.excluded

    def available(self, rnd: int) -> bool:
        return rnd > self.unavailable_until

    def answered(self) -> None:
        self.missed = 0

    def miss(self, rnd: int, after: int, pause: int) -> None:
        """One more round without an answer; ``after`` in a row pauses sampling
        this device for ``pause`` rounds (``after`` = 0: never). A device back from
        a pause that misses again is paused again at once."""
        self.missed += 1
        if after > 0 and self.missed >= after:
            self.unavailable_until = rnd + pause

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


class DeviceRecords(dict):
    """Device index -> ``DeviceRecord``, made on first use: a device with no
    record yet is one that never took part. ``get`` and ``in`` make none."""

    def __missing__(self, device: int) -> DeviceRecord:
        record = self[device] = DeviceRecord(f"device-{device:05d}")
        return record


class Eligible:
    """The devices that can train in round ``rnd``, as a membership test over the
    whole fleet without listing it: present in this session (``present``: device
    index -> node id), budget not spent, data not deleted or excluded, not paused.
    A device without a record never took part and is eligible if present."""

    def __init__(self, present: Collection[int], records: dict[int, DeviceRecord],
                 exhausted: Collection[int], rnd: int) -> None:
        self.present, self.records, self.exhausted, self.rnd = present, records, exhausted, rnd

    def __contains__(self, device: int) -> bool:
        if device not in self.present or device in self.exhausted:
            return False
        record = self.records.get(device)
        return record is None or (not record.gone and record.available(self.rnd))

    def any(self) -> bool:
        """Whether at least one device can train (O(devices with a record))."""
        blocked = sum(1 for d in set(self.exhausted) if d in self.present) + sum(
            1 for d, r in self.records.items() if d in self.present and d not in self.exhausted
            and (r.gone or not r.available(self.rnd)))
        return blocked < len(self.present)


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


def parse_train_replies(replies: list[Message], sampled: Collection[int],
                        records: dict[int, DeviceRecord], max_examples: float = math.inf
                        ) -> tuple[dict[int, tuple[P.TrainReport, Message]], dict[int, str],
                                   dict[int, str]]:
    """Typed reports of the devices asked this round; the devices whose reply was an
    error (failed); and those whose reply failed validation (rejected, with why).

    Replies from devices not asked, and second replies, are dropped: input from a
    device is untrusted. A ledger that went backwards (fewer participations or
    DP-SGD steps than the device reported before) is rejected: a device's ledger
    never rolls back (``clients.device_state``), so the reply is not its own."""
    reports, failed, rejected = {}, {}, {}
    asked = set(sampled)
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in asked or node in reports or node in failed or node in rejected:
            continue
        if reply.has_error():
            failed[node] = "failed: " + _error_reason(reply)
            continue
        try:
            report = P.TrainReport.from_message(reply, max_examples)
            _check_ledger_forward(records[node], report)
        except P.MalformedReply as err:
            rejected[node] = f"rejected: malformed reply ({err})"
            continue
        reports[node] = (report, reply)
    for node in asked - set(reports) - set(failed) - set(rejected):
        failed[node] = "failed: no reply within fleet.round_timeout"
    return reports, failed, rejected


def _error_reason(reply: Message) -> str:
    """What kind of error a device's reply reports. Only Flower's error code is
    kept: the error's text is the device's exception message, which may name its
    files (the server keeps no file names, paths or photo ids)."""
    code = int(getattr(reply.error, "code", ErrorCode.UNKNOWN))
    return ERROR_KINDS.get(code, f"error code {code}")


ERROR_KINDS = {
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "the device could not load its ClientApp",
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "the device's ClientApp raised an exception",
    ErrorCode.CLIENT_APP_CRASHED: "the device's ClientApp crashed",
    ErrorCode.NODE_UNAVAILABLE: "the device went offline",
    ErrorCode.MESSAGE_UNAVAILABLE: "the message did not reach the device",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "the reply was lost",
}


def _check_ledger_forward(record: DeviceRecord, report: P.TrainReport) -> None:
    """An update whose ledger went backwards is not the device's own. A reply that
    sends no update (a refusal: e.g. its newest ledger is unreadable) keeps its
    reason; the record keeps the larger counts (``fold_train_reports``)."""
    if report.arrays is None and not report.trained:
        return
    if report.participations < record.participations or report.ledger_steps < record.steps:
        raise P.MalformedReply(
            f"ledger went backwards ({report.participations} participations, "
            f"{report.ledger_steps} steps after {record.participations}, {record.steps})")


def note_availability(records: dict[int, DeviceRecord], sampled: Collection[int],
                      failed: Collection[int], rnd: int, after: int, pause: int) -> None:
    """Devices that did not answer missed the round; every other sampled device
    answered (even a rejected or refusing reply is an answer)."""
    for node in sampled:
        if node in failed:
            records[node].miss(rnd, after, pause)
        else:
            records[node].answered()


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
    for node, (report, reply) in reports.items():
        record = records[node]
        # The server's view of a ledger only grows (a refusal may report an older one).
        record.participations = max(record.participations, report.participations)
        record.steps = max(record.steps, report.ledger_steps)
        record.sample_rate = report.sample_rate or record.sample_rate
        record.epsilon = report.photo_eps
        record.status = "trained"
        record.note(report.consent, report.reason)
        if report.budget_exhausted:
            exhausted.add(node)
            record.status = "budget exhausted"
        elif report.trained and report.budget_spent:  # its last update: not asked again
            exhausted.add(node)
            record.status = "trained; budget now spent"
        if node in failed:
            record.status = failed[node]
        elif report.trained and (report.arrays is not None or S.MASKED in reply.content):
            # (under secure aggregation the update comes masked, not as arrays)
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
