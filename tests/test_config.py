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
])
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose([override]))


def test_delta_must_be_below_one_over_photos():
    with pytest.raises(ConfigError, match="1/data.photos_max"):
        validate(compose(["privacy.photo.delta=0.03", "data.photos_max=40"]))


def test_privacy_none_needs_no_noise():
    validate(compose(["privacy=none"]))
