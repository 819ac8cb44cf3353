"""The privacy report says exactly what holds: the noise mode, which values are
simulated, what leaves devices and the server without DP, what is taken as public."""

import matplotlib.pyplot as plt
import pytest

from fl.config import compose
from fl.privacy.noise import SEEDED_CAVEAT
from fl.privacy.plan import privacy_plan
from fl.tracking import keys as K
from fl.tracking.privacy_report import epsilon_chart, report, to_markdown
from server.console import format_summary

SIMULATED = ["privacy.user.simulated_population=1000000",
             "privacy.user.simulated_cohort_size=1000", "privacy.user.budget_epsilon=2"]
HISTORY = {1: {K.USER_EPS: 40.0, K.SIM_USER_EPS: 0.5, K.USER_DELTA: 1e-3,
               K.USER_NOISE_MULTIPLIER: 0.01, K.PHOTO_EPS_MAX: 1.0, K.PHOTO_EPS_MEAN: 0.8},
           2: {K.USER_EPS: 80.0, K.SIM_USER_EPS: 0.9, K.USER_DELTA: 1e-3,
               K.USER_NOISE_MULTIPLIER: 0.01, K.PHOTO_EPS_MAX: 1.5, K.PHOTO_EPS_MEAN: 1.1}}


def _plan(*overrides):
    return privacy_plan(compose(list(overrides)))


def _summary(plan):
    return format_summary(HISTORY, plan, "run", "mlflow ui", "exp")


def test_seeded_noise_is_stated_with_its_caveat_in_units_and_trust():
    data = report(_plan("privacy.noise=seeded"), HISTORY)
    assert data["noise"]["mode"] == "seeded" and data["noise"]["caveat"] == SEEDED_CAVEAT
    assert all("do not know the seed" in text for text in data["units"].values())
    assert any(SEEDED_CAVEAT in line for line in data["trust_assumptions"])
    markdown = to_markdown(data)
    assert "**Noise:** seeded" in markdown and SEEDED_CAVEAT in markdown


def test_secure_noise_says_where_it_comes_from_and_drops_the_seeded_line():
    data = report(_plan("privacy.noise=secure"), HISTORY)
    assert data["noise"]["mode"] == "secure" and data["noise"]["caveat"] is None
    source = data["noise"]["source"]
    assert "device" in source and "Poisson" in source and "server" in source
    assert "DP-FedAvg" in source and "operating system" in source
    markdown = to_markdown(data)
    assert "seeded PRNG" not in markdown and SEEDED_CAVEAT not in markdown
    assert not any("do not know the seed" in text for text in data["units"].values())


def test_console_summary_shows_the_noise_mode():
    seeded, secure = _summary(_plan()), _summary(_plan("privacy.noise=secure"))
    assert "noise        seeded" in seeded and SEEDED_CAVEAT in seeded
    assert "noise        secure" in secure and SEEDED_CAVEAT not in secure


def test_simulated_budget_and_target_sit_in_the_simulated_section():
    plan = _plan(*SIMULATED)
    data = report(plan, HISTORY)
    real, simulated = data["user_level"], data["user_level_simulated"]
    assert "budget_epsilon" not in real and "noise_calibrated_for_target_epsilon" not in real
    assert simulated["budget_epsilon"] == 2
    # the real run's own mechanism: sigma*k/K over the real fleet of N
    assert real["population"] == 100 and real["cohort"] == 10
    assert real["noise_multiplier"] == pytest.approx(1.0 * 10 / 1000)
    assert real["final_epsilon"] == 80.0 and simulated["final_epsilon"] == 0.9
    assert simulated["population"] == 1_000_000 and simulated["cohort"] == 1000
    assert "SIMULATED deployment" in to_markdown(data)


def test_a_calibrated_target_under_simulation_is_the_simulations():
    plan = _plan(*SIMULATED, "privacy.user.noise_multiplier=null",
                 "privacy.user.target_epsilon=2")
    data = report(plan, HISTORY)
    assert data["user_level_simulated"]["noise_calibrated_for_target_epsilon"] == 2
    assert "noise_calibrated_for_target_epsilon" not in data["user_level"]


def test_under_simulation_the_real_user_guarantee_is_never_said_to_hold():
    units = report(_plan(*SIMULATED), HISTORY)["units"]
    assert not units["user"].startswith("holds")
    assert "no target or budget applies" in units["user"] and "80" in units["user"]
    assert report(_plan(), HISTORY)["units"]["user"].startswith("holds")


def _budget_line_and_series(plan):
    figure = epsilon_chart(HISTORY, plan)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    plt.close(figure)
    budgets = [label for label in lines if label.startswith("user") and "budget" in label]
    return lines, budgets


def test_chart_draws_the_user_budget_against_the_simulated_series_only():
    lines, budgets = _budget_line_and_series(_plan(*SIMULATED))
    assert len(budgets) == 1 and "SIMULATED" in budgets[0]
    simulated = lines["user-level, SIMULATED deployment"]
    assert lines[budgets[0]].get_color() == simulated.get_color()
    assert lines[budgets[0]].get_color() != lines["user-level"].get_color()


def test_chart_draws_a_real_budget_against_the_real_series():
    lines, budgets = _budget_line_and_series(_plan("privacy.user.budget_epsilon=90"))
    assert budgets == ["user-level budget 90"]
    assert lines[budgets[0]].get_color() == lines["user-level"].get_color()


def test_training_photo_baselines_and_loss_are_listed_as_released_without_dp():
    released = report(_plan(), HISTORY)["released_without_dp"]
    for key in (K.SWAP_PSNR_BASELINE_MEAN, K.PORTRAIT_PSNR_BASELINE_MEAN, K.TRAIN_LOSS):
        assert any(key in what and "not covered by DP" in dp
                   for what, dp in released.items()), key


def test_docs_do_not_claim_photo_protection_against_everything_a_device_releases():
    """The baselines and the loss leave the device without DP, so the photo-level
    guarantee covers the DP-SGD updates only; docs/privacy.md must say so."""
    from pathlib import Path

    docs = (Path(__file__).parents[2] / "docs" / "privacy.md").read_text()
    assert "against everything its device releases" not in docs
    assert "baseline_mean" in docs and "privacy.noise" in docs


def test_what_the_server_releases_outside_dp_is_listed_with_what_it_weakens():
    data = report(_plan(), HISTORY)
    released = data["released_by_server_without_dp"]
    for key in (K.UPDATE_CLIP_FRACTION, K.DEVICES_TRAINED, K.DEVICES_SAMPLED,
                K.DEVICES_FAILED, "privacy/ledger.json"):
        weakens = [text for what, text in released.items() if key in what]
        assert len(weakens) == 1 and len(weakens[0]) > 40, key
    clip = next(t for w, t in released.items() if K.UPDATE_CLIP_FRACTION in w)
    assert "un-noised" in clip
    ledger = next(t for w, t in released.items() if "ledger" in w)
    assert "took part" in ledger
    assert "## What the server releases outside DP" in to_markdown(data)


def test_the_photo_count_is_stated_to_be_public():
    data = report(_plan(), HISTORY)
    public = next(text for what, text in data["treated_as_public"].items()
                  if "photo count n" in what)
    assert "q = 1/ceil(n/B)" in public and "steps" in public
    assert "## Treated as public" in to_markdown(data)
