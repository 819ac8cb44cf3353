"""A device's reply is untrusted: every field is checked in one place
(``TrainReport.from_message``) and a bad reply fails that device only."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord

from fl import protocol as P
from server.records import (
    DeviceRecord,
    fold_train_reports,
    newer_state,
    parse_train_replies,
)
from tests.privacy.replies import train_reply

GOOD = {P.TRAINED: 1, P.BUDGET_EXHAUSTED: 0, P.PARTICIPATIONS: 2, P.LEDGER_STEPS: 20,
        P.SAMPLE_RATE: 0.25, P.PHOTO_EPS: 1.5, P.TRAIN_LOSS: 0.1, P.PHOTOS_USED: 12,
        P.PHOTOS_WITHDRAWN: 1}


def _records(*nodes: int) -> dict[int, DeviceRecord]:
    return {n: DeviceRecord(f"device-{n:05d}") for n in nodes}


def _parse(replies, sampled, records=None):
    return parse_train_replies(replies, sampled, records or _records(*sampled), max_examples=40)


def _reply(node: int, **metrics):
    reply = train_reply(node, {"w": torch.zeros(2)}, examples=12)
    for key, value in (GOOD | metrics).items():
        if value is not None:
            reply.content[P.METRICS][key] = value
    return reply


def test_a_well_formed_reply_is_typed():
    report = P.TrainReport.from_message(_reply(4))
    assert (report.node, report.trained, report.participations, report.examples) == (4, True,
                                                                                       2, 12)
    assert report.consent == {P.PHOTOS_WITHDRAWN: 1} and report.arrays["w"].shape == (2,)


@pytest.mark.parametrize("metrics,reason", [
    ({P.PHOTO_EPS: None}, "missing 'photo-eps'"),
    ({P.PHOTO_EPS: math.nan}, "outside"),
    ({P.PARTICIPATIONS: math.inf}, "outside"),
    ({P.PARTICIPATIONS: -1}, "outside"),
    ({P.PARTICIPATIONS: 2.5}, "whole number"),
    ({P.SAMPLE_RATE: 2.0}, "outside"),
    ({P.TRAINED: 7}, "outside"),
    ({P.DELETED: 3}, "outside"),
    ({P.NEWER_STATE_ROUND: math.nan}, "outside"),
    ({P.WEIGHT_KEY: 10**9}, "outside"),  # more photos than any device holds (photos_max)
    ({P.PHOTOS_USED: 41}, "outside"),
    ({P.BUDGET_SPENT: 2}, "outside"),
])
def test_a_malformed_reply_fails_that_device_with_a_reason(metrics, reason):
    reports, failed, rejected = _parse([_reply(1), _reply(2, **metrics)], [1, 2])
    assert list(reports) == [1] and failed == {}
    assert rejected[2].startswith("rejected: malformed reply") and reason in rejected[2]


def test_replies_from_devices_not_asked_and_second_replies_are_dropped():
    reports, failed, rejected = parse_train_replies(
        [_reply(1), _reply(1, **{P.PHOTO_EPS: 9.0}), _reply(99)], sampled=[1],
        records=_records(1))
    assert list(reports) == [1] and reports[1][0].photo_eps == 1.5
    assert failed == {} and rejected == {}


def test_a_rejected_update_adds_no_loss_or_photos_but_keeps_its_ledger_row():
    records = {1: DeviceRecord("device-00001"), 2: DeviceRecord("device-00002")}
    reports, _, _ = parse_train_replies([_reply(1), _reply(2, **{P.TRAIN_LOSS: 5.0})], [1, 2],
                                        records)
    losses, photos = fold_train_reports(records, reports, {2: "rejected: update ..."}, set())
    assert losses == [0.1] and photos == 12
    assert records[2].status == "rejected: update ..." and records[2].epsilon == 1.5


def test_only_a_plausible_later_round_stops_the_run():
    records = {1: DeviceRecord("device-00001")}
    for later, expected in [(10**9, ""), (3, ""), (4, "device-00001")]:
        reports, _, _ = parse_train_replies([_reply(1, **{P.NEWER_STATE_ROUND: later})], [1],
                                            records)
        assert newer_state(records, reports, rnd=3, rounds=20)[0] == expected


def test_a_ledger_that_goes_backwards_is_rejected():
    records = _records(1)
    records[1].participations, records[1].steps = 3, 30
    for metrics in ({P.PARTICIPATIONS: 2}, {P.LEDGER_STEPS: 29}):
        reports, _, rejected = _parse([_reply(1, **metrics)], [1], records)
        assert reports == {} and "went backwards" in rejected[1]
    reports, _, rejected = _parse([_reply(1, **{P.PARTICIPATIONS: 3, P.LEDGER_STEPS: 30})],
                                  [1], records)
    assert list(reports) == [1] and rejected == {}
    # A refusal that sends no update keeps its reason, and the record its counts.
    refusal = _reply(1, **{P.TRAINED: 0, P.PARTICIPATIONS: 1})
    del refusal.content[P.ARRAYS]
    refusal.content[P.STATUS] = ConfigRecord({P.REASON: "refused: ledger unreadable"})
    reports, _, rejected = _parse([refusal], [1], records)
    assert rejected == {}
    fold_train_reports(records, reports, {}, set())
    assert records[1].participations == 3 and "ledger unreadable" in records[1].status


def test_silent_and_erring_devices_fail_without_their_error_text():
    """An error reply's text is the device's exception message, which may name its
    files: the server keeps only what kind of error it was."""
    from flwr.app import Error, Message, Metadata
    from flwr.common.constant import ErrorCode

    meta = Metadata(run_id=1, message_id="e", src_node_id=2, dst_node_id=0,
                    reply_to_message_id="m", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    error = Message(metadata=meta, error=Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                               "FileNotFoundError: /home/ann/Ann_Lee_0001.jpg"))
    reports, failed, rejected = _parse([_reply(1), error], [1, 2, 3])
    assert list(reports) == [1] and rejected == {}
    assert failed == {2: "failed: the device's ClientApp raised an exception",
                      3: "failed: no reply within fleet.round_timeout"}


def test_a_device_that_misses_rounds_in_a_row_is_paused_then_tried_again():
    from server.records import note_availability

    records = _records(1, 2)
    for rnd in (1, 2):
        note_availability(records, [1, 2], {2: "failed"}, rnd, after=2, pause=5)
    assert records[1].available(3) and not records[2].available(3)
    assert not records[2].available(7) and records[2].available(8)
    note_availability(records, [2], {2: "failed"}, 8, after=2, pause=5)  # missed again
    assert not records[2].available(9)
    note_availability(records, [2], {}, 14, after=2, pause=5)  # answered: counts from 0
    assert records[2].missed == 0


def test_a_device_whose_budget_admits_no_further_round_is_not_asked_again():
    """``budget-spent`` with an update: the device counts as exhausted at once (the
    sampler drops it), where before it was asked once more and refused."""
    records, exhausted = _records(1, 2, 3), set()
    reports, _, _ = _parse([_reply(1, **{P.BUDGET_SPENT: 1}), _reply(2),
                            _reply(3, **{P.BUDGET_SPENT: 0})], [1, 2, 3], records)
    losses, _ = fold_train_reports(records, reports, {}, exhausted)
    assert exhausted == {1} and len(losses) == 3  # its update still counts
    assert records[1].status == "trained; budget now spent" and records[2].status == "trained"
