"""The audit's report and its refusals, on real statistics objects."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fl.audit import canary_devices as CD
from fl.audit import one_run
from fl.audit import report as R
from fl.audit.inversion import Inversion
from fl.config import ConfigError, compose
from fl.tracking import keys as K
from server.audit import (
    MIN_USER_CANARIES,
    AuditResult,
    AuditSettings,
    assign_roles,
    chance_sampled,
    check_auditable,
)

ISSUE_KEYS = {"audit/photo_eps_lower", "audit/photo_eps_theory", "audit/user_eps_lower",
              "audit/user_eps_theory", "audit/canaries", "audit/correct_guesses",
              "audit/inversion_psnr", "audit/inversion_ssim", "audit/mean_face_psnr",
              "audit/violation"}
JSON_KEYS = {"photo.epsilon_lower_bound", "photo.epsilon_theory", "user.epsilon_lower_bound",
             "user.epsilon_theory", "inversion.psnr", "inversion.mean_face_psnr", "confidence"}


def _result(photo_theory: float, user_theory: float, separated: bool) -> AuditResult:
    rng = np.random.default_rng(0)
    coins = rng.random(200) < 0.5
    scores = coins * (10.0 if separated else 0.0) + rng.normal(size=200)
    photo = one_run.audit(scores, coins, 1e-5)
    user = CD.estimate(rng.normal(0.05, 0.01, 50), rng.normal(0, 0.01, 50), delta=1e-5)
    inv = Inversion(12.0, 0.3, 15.0, np.zeros((2, 3, 8, 8)), 0, np.zeros((3, 8, 8)),
                    "device update")
    return AuditResult("run", photo, photo_theory, user, user_theory, inv, 3,
                       AuditSettings(), None)


def test_metrics_are_exactly_the_issue_keys_and_json_holds_its_keys():
    data = R.build(_result(8.0, math.inf, True), {"photo": 2.5e-3, "user": None},
                   {"photo": 6.0})
    metrics = R.metrics(data)
    assert set(metrics) == ISSUE_KEYS
    assert {v for k, v in vars(K).items() if k.startswith("AUDIT_")} == ISSUE_KEYS
    assert metrics[K.AUDIT_USER_EPS_THEORY] == math.inf  # the unit is off
    assert metrics[K.AUDIT_CANARIES] == 200
    parsed = json.loads(R.as_json(data))
    assert JSON_KEYS <= set(parsed)
    assert parsed["user.epsilon_theory"] is None and parsed["confidence"] == 0.95
    assert "No violation" in R.to_markdown(data)


def test_a_bound_above_the_theory_is_a_violation():
    broken = _result(1.0, math.inf, separated=True)
    assert broken.photo.epsilon_lower > 1.0 and broken.violation
    data = R.build(broken, {}, {})
    assert R.metrics(data)[K.AUDIT_VIOLATION] == 1.0
    assert "VIOLATION" in R.to_markdown(data)
    fine = _result(50.0, math.inf, separated=False)
    assert not fine.violation
    user_broken = _result(50.0, 0.01, separated=False)  # the estimate's interval passes it
    assert user_broken.user.interval[0] > 0.01 and user_broken.violation


def test_roles_never_overlap_and_depend_on_no_coin():
    roles = assign_roles(40, AuditSettings(user_canaries=0.25, inversion_devices=2), seed=1)
    users, photo = set(roles.user_canaries), set(roles.photo_devices)
    assert len(roles.inversion) == 2 and len(users) == 10 and len(roles.held_out) == 10
    assert not (users & photo) and not (set(roles.inversion) & (users | photo))
    assert roles == assign_roles(40, AuditSettings(user_canaries=0.25, inversion_devices=2), 1)


def test_enough_canary_users_are_expected_to_be_sampled_for_an_estimate():
    """The share alone gave a 20-device, 3-round run 4 canary users: too few drawn."""
    s = AuditSettings(user_canaries=0.2, inversion_devices=2)
    short = chance_sampled(20, 10, 3)  # 0.875
    roles = assign_roles(20, s, 0, short)
    assert len(roles.user_canaries) == 9 and len(roles.photo_devices) == 9  # half the rest
    assert len(roles.user_canaries) * short >= MIN_USER_CANARIES
    default = chance_sampled(100, 10, 20)  # the default fleet: the share suffices
    assert len(assign_roles(100, s, 0, default).user_canaries) == 20
    assert 20 * default >= 2 * MIN_USER_CANARIES
    assert not assign_roles(20, AuditSettings(user_canaries=0.0), 0, short).user_canaries


@pytest.mark.parametrize("override, reason", [
    ("data=device", "data=device"), ("aggregation.secure=true", "aggregation.secure=false"),
    ("task=portrait", "task=swap"), ("faults=all", "faults.kinds=\\[\\]"),
    ("local.personal_epochs=2", "local.personal_epochs=0")])
def test_the_audit_refuses_what_it_must_not_audit(override, reason):
    with pytest.raises(ConfigError, match=reason):
        check_auditable(compose([override]))
