"""Consent manifests: purposes, expiry, revocation, defaults, broken files."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from fl.data import consent as C

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
TRAIN, HELD = ("photo-0000", "photo-0001", "photo-0002"), ("photo-0003",)


def test_only_photos_whose_consent_covers_the_purpose_and_is_current_are_used(tmp_path):
    m = C.Manifest()
    m.grant(["photo-0000", "photo-0003"], now=NOW - timedelta(days=3))
    m.grant(["photo-0001"], purposes=[C.EVALUATION], now=NOW - timedelta(days=3))
    m.grant(["photo-0002"], now=NOW - timedelta(days=3), expires=NOW - timedelta(hours=1))
    C.write_manifest(tmp_path, m)
    decision = C.decide(C.read_manifest(tmp_path), "grant", TRAIN, HELD, now=NOW)
    # 0000: both purposes; 0001: evaluation only; 0002: expired
    assert decision.train == (True, False, False) and decision.heldout == (True,)
    assert decision.withdrawn == 1  # the expired one


def test_revocation_applies_from_its_time_on(tmp_path):
    m = C.Manifest()
    m.grant(TRAIN + HELD, now=NOW - timedelta(days=1))
    m.revoke(["photo-0001", "photo-0003"], now=NOW)
    C.write_manifest(tmp_path, m)
    again = C.read_manifest(tmp_path)
    before = C.decide(again, "grant", TRAIN, HELD, now=NOW - timedelta(seconds=1))
    after = C.decide(again, "grant", TRAIN, HELD, now=NOW)
    assert before.train == (True, True, True) and before.withdrawn == 0
    assert after.train == (True, False, True) and after.heldout == (False,)
    assert after.withdrawn == 2


def test_a_manifest_is_explicit_and_the_default_applies_only_without_one(tmp_path):
    m = C.Manifest()
    m.grant(["photo-0000"], now=NOW)
    assert C.decide(m, "grant", TRAIN, HELD, now=NOW).train == (True, False, False)
    assert C.decide(None, "grant", TRAIN, HELD).train == (True,) * 3
    assert C.decide(None, "deny", TRAIN, HELD).heldout == (False,)
    with pytest.raises(C.ConsentError, match="consent_default"):
        C.decide(None, "auto", TRAIN, HELD)
    assert C.read_manifest(tmp_path / "nobody") is None


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    ('{"format": 2}', '"format": 1'),
    ('{"format": 1, "photos": {"p": {"purposes": ["marketing"]}}}', "purposes must be"),
    ('{"format": 1, "photos": {"p": {"purposes": ["evaluation"], "granted": "soon"}}}',
     "not an ISO 8601 time"),
])
def test_broken_manifests_are_refused_with_the_file_named(tmp_path, text, message):
    (tmp_path / C.MANIFEST).write_text(text)
    with pytest.raises(C.ConsentError, match=message) as err:
        C.read_manifest(tmp_path)
    assert str(tmp_path / C.MANIFEST) in str(err.value)
    # a device with a broken manifest uses nothing, and says why
    decision = C.decide(None, "grant", TRAIN, HELD, error=str(err.value))
    assert not any(decision.train + decision.heldout) and "consent.json" in decision.reason


GOOD = {"purposes": ["federated-training"], "granted": "2026-11-01T09:00:00+00:00"}


@pytest.mark.parametrize(("manifest", "log", "public"), [
    # the string "false" is truthy: read leniently it erased the user's state
    ({"delete_my_data": "false"}, '"delete_my_data" is \'false\'',
     '"delete_my_data" is not true or false'),
    ({"delete_my_data": 0}, "must be true or false", '"delete_my_data" is not true or false'),
    ({"format": True}, '"format": 1', "not a format-1 manifest"),
    ({"photos": ["Ann_Lee_0001.jpg"]}, '"photos" must be an object', '"photos" is not an object'),
    ({"photos": {"Ann_Lee_0001.jpg": ["evaluation"]}}, "must be an object",
     "1 photo entry with a value that is not an object"),
    ({"photos": {"Ann_Lee_0001.jpg": {**GOOD, "purposes": "evaluation"}}},
     "purposes must be a list", '1 photo entry with a bad "purposes" list'),
    ({"photos": {"Ann_Lee_0001.jpg": {**GOOD, "purposes": [["evaluation"]]}}},
     "purposes must be a list", '1 photo entry with a bad "purposes" list'),
    ({"photos": {"Ann_Lee_0001.jpg": {**GOOD, "granted": 20261101},
                 "Ann_Lee_0002.jpg": {**GOOD, "granted": True}}},
     "not an ISO 8601 time", '2 photo entries with a bad "granted" time'),
    ({"photos": {"Ann_Lee_0001.jpg": {**GOOD, "expires": "soon"}}}, "expires",
     '1 photo entry with a bad "expires" time'),
    ({"photos": {"Ann_Lee_0001.jpg": {**GOOD, "revokd": None}}}, "unknown keys ['revokd']",
     "1 photo entry with an unknown key"),
    ({"delete_my_dat": True}, "unknown keys ['delete_my_dat']", "1 unknown top-level key"),
    ({"deleted": 5}, "deleted: 5 is not an ISO 8601 time", '"deleted" is not an ISO 8601'),
])
def test_manifests_are_read_strictly_and_the_public_reason_names_no_photo(
        tmp_path, manifest, log, public):
    """Every documented type is checked. The message for the user and the device's
    log names the file and the entries; the reason a device sends the server says
    what kind of problem and how many photos, never which photo or where."""
    (tmp_path / C.MANIFEST).write_text(json.dumps({"format": 1, **manifest}))
    with pytest.raises(C.ConsentError) as err:
        C.read_manifest(tmp_path)
    assert log in str(err.value) and str(tmp_path / C.MANIFEST) in str(err.value)
    assert public in err.value.public
    assert "Ann_Lee" not in err.value.public and str(tmp_path) not in err.value.public


def test_every_problem_is_listed_at_once(tmp_path):
    (tmp_path / C.MANIFEST).write_text(
        '{"format": 1, "delete_my_data": "no", "photos": {"a.jpg": {"purposes": "x"}, '
        '"b.jpg": {"purposes": ["evaluation"], "granted": "later"}}}')
    with pytest.raises(C.ConsentError) as err:
        C.read_manifest(tmp_path)
    assert err.value.public == (
        'consent.json is invalid: "delete_my_data" is not true or false; 1 photo entry '
        'with a bad "purposes" list; 1 photo entry with a bad "granted" time')
    assert "'a.jpg'" in str(err.value) and "'b.jpg'" in str(err.value)


def test_a_manifest_that_is_not_text_is_refused(tmp_path):
    (tmp_path / C.MANIFEST).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(C.ConsentError, match="not UTF-8") as err:
        C.read_manifest(tmp_path)
    assert err.value.public == "consent.json is not valid JSON"
