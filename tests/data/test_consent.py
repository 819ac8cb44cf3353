"""Consent manifests: purposes, expiry, revocation, defaults, broken files."""

from __future__ import annotations

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
