"""A device's reply is untrusted: every field is checked in one place
(``TrainReport.from_message``) and a bad reply fails that device only."""

from __future__ import annotations

import math

import pytest
import torch

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
])
def test_a_malformed_reply_fails_that_device_with_a_reason(metrics, reason):
    reports, failed, rejected = parse_train_replies([_reply(1), _reply(2, **metrics)],
                                                    sampled=[1, 2])
    assert list(reports) == [1] and failed == {}
    assert rejected[2].startswith("rejected: malformed reply") and reason in rejected[2]


def test_replies_from_devices_not_asked_and_second_replies_are_dropped():
    reports, failed, rejected = parse_train_replies(
        [_reply(1), _reply(1, **{P.PHOTO_EPS: 9.0}), _reply(99)], sampled=[1])
    assert list(reports) == [1] and reports[1][0].photo_eps == 1.5
    assert failed == {} and rejected == {}


def test_a_rejected_update_adds_no_loss_or_photos_but_keeps_its_ledger_row():
    records = {1: DeviceRecord("device-00001"), 2: DeviceRecord("device-00002")}
    reports, _, _ = parse_train_replies([_reply(1), _reply(2, **{P.TRAIN_LOSS: 5.0})], [1, 2])
    losses, photos = fold_train_reports(records, reports, {2: "rejected: update ..."}, set())
    assert losses == [0.1] and photos == 12
    assert records[2].status == "rejected: update ..." and records[2].epsilon == 1.5


def test_only_a_plausible_later_round_stops_the_run():
    records = {1: DeviceRecord("device-00001")}
    for later, expected in [(10**9, ""), (3, ""), (4, "device-00001")]:
        reports, _, _ = parse_train_replies([_reply(1, **{P.NEWER_STATE_ROUND: later})], [1])
        assert newer_state(records, reports, rnd=3, rounds=20)[0] == expected
