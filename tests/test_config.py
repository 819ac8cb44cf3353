"""Invalid values fail before training, naming the key."""

import pytest

from fl.config import ConfigError, compose, flatten, validate


def test_default_config_is_valid_and_flattens_to_params():
    cfg = compose()
    validate(cfg)
    params = flatten(cfg)
    assert params["privacy.photo.noise_multiplier"] == "1.0"
    assert params["task.name"] == "swap" and params["fleet.num_devices"] == "100"


@pytest.mark.parametrize("override,key", [
    ("privacy.photo.noise_multiplier=-0.5", "privacy.photo.noise_multiplier"),
    ("privacy.photo.delta=1.0", "privacy.photo.delta"),
    ("privacy.photo.delta=0.5", "privacy.photo.delta"),
    ("fleet.devices_per_round=101", "fleet.devices_per_round"),
    ("fleet.eval_devices=500", "fleet.eval_devices"),
    ("data.image_size=40", "data.image_size"),
    ("data.photos_max=5", "data.photos_max"),
    ("task.name=nope", "task.name"),
    ("privacy.photo.accountant=gdp", "privacy.photo.accountant"),
    ("local.batch_size=0", "local.batch_size"),
    ("tracking.samples_every=-1", "tracking.samples_every"),
    # Wrong types and ranges fail at validation, naming the key, not deep in a run.
    ("fleet.rounds=abc", "fleet.rounds"),
    ("fleet.rounds=2.5", "fleet.rounds"),
    ("fleet.round_timeout=0", "fleet.round_timeout"),
    ("fleet.round_timeout=-5", "fleet.round_timeout"),
    ("fleet.devices_per_round=2.5", "fleet.devices_per_round"),
    ("fleet.start_quorum=0", "fleet.start_quorum"),
    ("fleet.start_quorum=1.5", "fleet.start_quorum"),
    ("fleet.retry_after=0", "fleet.retry_after"),
    ("local.epochs=nan", "local.epochs"),
    ("local.lr_shared=true", "local.lr_shared"),
    ("privacy.photo.max_grad_norm=inf", "privacy.photo.max_grad_norm"),
    ("privacy.user.clip=inf", "privacy.user.clip"),
    ("seed=abc", "seed"),
    ("faults.share=0.3", "faults.kinds"),
    ("faults.kinds=[nan]", "faults.share"),
    ("faults.share=1.5", "faults.share"),
    ("faults=all faults.kinds=[nan,bogus]", "faults.kinds"),
])
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose(override.split()))


def test_faults_are_for_simulated_fleets_only():
    validate(compose(["faults=all"]))
    with pytest.raises(ConfigError, match="faults.kinds.*data=device"):
        validate(compose(["faults=all", "data=device", "privacy.noise=secure",
                          "devices.consent_default=deny"]))


def test_delta_must_be_below_one_over_photos():
    with pytest.raises(ConfigError, match="1/data.photos_max"):
        validate(compose(["privacy.photo.delta=0.03", "data.photos_max=40"]))


def test_privacy_none_needs_no_noise():
    validate(compose(["privacy=none"]))


@pytest.mark.parametrize("overrides,key", [
    (["privacy.photo.noise_multiplier=null"], "privacy.photo.noise_multiplier"),
    (["privacy.photo.target_epsilon=3"], "privacy.photo.noise_multiplier"),
    (["privacy=photo_user", "privacy.user.delta=0.02"], "privacy.user.delta"),
    (["privacy=photo_user", "privacy.user.clip=0"], "privacy.user.clip"),
    (["privacy=photo_user", "fleet.sampling=fixed", "privacy.user.accountant=pld"],
     "privacy.user.accountant"),
    (["privacy=photo_user", "privacy.user.simulated_cohort_size=10"],
     "privacy.user.simulated_cohort_size"),
    (["fleet.sampling=bernoulli"], "fleet.sampling"),
    (["privacy.noise=urandom"], "privacy.noise"),
    (["strategy._target_=os.makedirs"], "strategy._target_"),
    (["strategy.update_norm_bound=abc"], "strategy.update_norm_bound"),
    (["strategy.update_norm_bound=inf"], "strategy.update_norm_bound"),
    (["strategy.max_examples=2.5"], "strategy.max_examples"),
    (["data=device", "devices.consent_default=deny"], "privacy.noise"),
])
def test_privacy_values_that_cannot_work_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose(overrides))


def test_deltas_follow_the_data_and_targets_calibrate_noise():
    from fl.privacy.plan import privacy_plan

    plan = privacy_plan(compose(["privacy=photo_user", "data.photos_max=50",
                                 "privacy.user.noise_multiplier=null",
                                 "privacy.user.target_epsilon=4"]))
    assert plan.photo.delta == 0.1 / 50 and plan.user.mechanism.delta == 0.1 / 100
    assert plan.user.budget_epsilon == 4 and plan.user.target_epsilon == 4
    assert plan.user.mechanism.epsilon(20) <= 4 < plan.user.mechanism.epsilon(21) * 1.5


def test_plan_params_never_hold_simulated_values_under_real_names():
    """Under a simulated cohort, privacy.plan.user_* are the real run's values (noise
    multiplier sigma*k/K on the real fleet); the simulation's, and the budget that
    limits only it, are logged as privacy.plan.simulated_user_*."""
    from fl.privacy.plan import privacy_plan

    params = privacy_plan(compose(["privacy.user.simulated_population=1000000",
                                   "privacy.user.simulated_cohort_size=1000",
                                   "privacy.user.budget_epsilon=2"])).params()
    assert params["privacy.plan.user_simulated"] == "True"
    assert params["privacy.plan.user_population"] == "100"
    assert params["privacy.plan.user_cohort"] == "10"
    assert float(params["privacy.plan.user_noise_multiplier"]) == pytest.approx(10 / 1000)
    assert float(params["privacy.plan.user_delta"]) == pytest.approx(0.1 / 100)
    assert "privacy.plan.user_budget_epsilon" not in params
    simulated = {k.removeprefix("privacy.plan.simulated_user_"): v for k, v in params.items()
                 if k.startswith("privacy.plan.simulated_user_")}
    assert simulated == {"noise_multiplier": "1", "delta": "1e-07", "population": "1000000",
                         "cohort": "1000", "budget_epsilon": "2", "noise_calibrated": "False"}
    plain = privacy_plan(compose()).params()
    assert plain["privacy.plan.user_population"] == "100"
    assert plain["privacy.plan.user_budget_epsilon"] == "0"
    assert not any("simulated_" in key for key in plain)


def test_photo_target_epsilon_is_also_the_device_budget():
    from fl.privacy.plan import privacy_plan

    plan = privacy_plan(compose(["privacy.photo.noise_multiplier=null",
                                 "privacy.photo.target_epsilon=5"]))
    assert plan.photo.budget_epsilon == 5 and plan.photo.target_epsilon == 5
    assert plan.photo.noise_multiplier > 0


@pytest.mark.parametrize("schedule, steps", [
    (["local.personal_epochs=0", "local.epochs=2"], 6),   # one joint phase: 2 x 3 steps
    (["local.personal_epochs=5", "local.epochs=1"], 18),  # personal 5 x 3, then shared 1 x 3
])
def test_calibrated_photo_noise_reaches_the_target_by_an_independent_accountant(
        schedule, steps):
    """The calibration (Opacus) checked with dp-accounting for the schedule it plans:
    the fewest photos (20, batch 8 -> q = 1/3, 3 batches an epoch) over
    ceil(20*10/100) = 2 participations, each of the steps of all its phases."""
    import dp_accounting as dpa

    from fl.privacy.plan import privacy_plan

    plan = privacy_plan(compose(["privacy.photo.noise_multiplier=null",
                                 "privacy.photo.target_epsilon=5", *schedule]))
    reference = dpa.rdp.RdpAccountant()
    reference.compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(1 / 3, dpa.GaussianDpEvent(plan.photo.noise_multiplier)),
        2 * steps))
    assert 0.95 * 5 <= reference.get_epsilon(plan.photo.delta) <= 5 * 1.02


def test_personal_only_training_cannot_claim_user_level_dp():
    with pytest.raises(ConfigError, match=r"task\.device_trains.*privacy=photo"):
        validate(compose(["task.device_trains=[]"]))
    validate(compose(["task.device_trains=[]", "privacy=photo"]))


@pytest.fixture(scope="module")
def lfw(tmp_path_factory):
    from fl.data.export import export_folders

    return export_folders(tmp_path_factory.mktemp("lfw"), people=3, photos=7)


def test_real_data_must_choose_a_consent_default(lfw):
    base = ["data=folders", f"data.root={lfw}", "data.photos_min=4", "data.heldout_photos=2",
            "fleet.devices_per_round=2", "fleet.eval_devices=2"]
    with pytest.raises(ConfigError, match=r"devices\.consent_default.*grant or deny"):
        validate(compose(base))
    validate(compose([*base, "devices.consent_default=deny"]))


def test_portrait_on_folders_asks_for_the_controls_csv(lfw):
    base = ["data=folders", f"data.root={lfw}", "data.photos_min=4", "data.heldout_photos=2",
            "devices.consent_default=grant", "task=portrait", "fleet.devices_per_round=2",
            "fleet.eval_devices=2"]
    with pytest.raises(ConfigError, match=r"data\.controls_csv.*file,yaw,pitch,smile"):
        validate(compose(base))
    validate(compose([*base, f"data.controls_csv={lfw / 'controls.csv'}"]))


def test_an_on_disk_fleet_is_sized_by_its_data(lfw, tmp_path):
    base = ["data=folders", f"data.root={lfw}", "data.heldout_photos=2",
            "devices.consent_default=grant", "fleet.devices_per_round=2", "fleet.eval_devices=2"]
    cfg = compose([*base, "data.photos_min=4"])
    validate(cfg)
    assert cfg.fleet.num_devices == 3  # 3 identities with >= 6 photos, capped from 100
    with pytest.raises(ConfigError, match="no identity with at least"):
        validate(compose([*base, "data.photos_min=6", "data.photos_max=40"]))
    with pytest.raises(ConfigError, match=r"data\.root"):
        validate(compose(["data=celeba", f"data.root={tmp_path / 'missing'}",
                          "devices.consent_default=grant"]))


def test_registering_a_model_needs_a_database_backed_store(tmp_path):
    with pytest.raises(ConfigError, match="Model Registry needs a database"):
        validate(compose(["tracking.register_model=fedface", f"tracking.uri=file://{tmp_path}"]))
    validate(compose(["tracking.register_model=fedface",
                      f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]))
