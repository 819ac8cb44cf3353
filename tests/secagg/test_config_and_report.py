"""``aggregation.*`` is validated before a run starts, and the privacy report
says what secure aggregation changes (and what it does not)."""

from __future__ import annotations

import pytest

from fl.config import ConfigError, compose, validate
from fl.privacy.plan import privacy_plan
from fl.tracking import keys as K
from fl.tracking.privacy_report import report, to_markdown


def test_secure_aggregation_needs_a_bound_and_a_mean():
    validate(compose(["aggregation.secure=true"]))  # user-level DP's clip bounds it
    with pytest.raises(ConfigError, match="strategy.update_norm_bound"):
        validate(compose(["aggregation.secure=true", "privacy=photo"]))
    with pytest.raises(ConfigError, match="median or a trimmed mean"):
        validate(compose(["aggregation.secure=true", "privacy=photo", "strategy=fedmedian",
                          "strategy.update_norm_bound=1"]))
    validate(compose(["aggregation.secure=true", "privacy=none",
                      "strategy.update_norm_bound=1"]))
    with pytest.raises(ConfigError, match="fleet.devices_per_round=1"):
        validate(compose(["aggregation.secure=true", "fleet.devices_per_round=1"]))
    with pytest.raises(ConfigError, match="aggregation.threshold"):
        validate(compose(["aggregation.secure=true", "aggregation.threshold=1.5"]))
    with pytest.raises(ConfigError, match="aggregation.secure"):
        validate(compose(["aggregation.secure=yes"]))


def test_the_report_states_what_secure_aggregation_changes():
    plan = privacy_plan(compose([]))
    plain = report(plan, {1: {K.USER_EPS: 1.0}})
    secure = report(plan, {1: {K.USER_EPS: 1.0, K.SECAGG_ABANDONED: 0.0}})
    assert plain["trust_assumptions"][0].startswith("No secure aggregation")
    text = secure["trust_assumptions"][0]
    assert "holds no individual update in the clear" in text
    assert "trusted to add the user-level noise" in text and "sample devices" in text
    assert "hostile device can send any field element" in text
    assert text in to_markdown(secure)
