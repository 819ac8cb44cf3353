"""DP-FedAvg: clipping, equal weights, noise of the stated size, ignored keys."""

import pytest
import torch

from fl.privacy.dp_fedavg import dp_fedavg


def _state(value: float, n: int = 1000) -> dict[str, torch.Tensor]:
    return {"head": torch.full((n,), value), "frozen": torch.zeros(3)}


def test_each_update_is_clipped_and_counts_once():
    base = _state(0.0)
    big, small = _state(10.0), _state(0.001)  # norms 316 and 0.03
    out = dp_fedavg(base, [big, small], ["head"], clip=1.0, noise_multiplier=0.0,
                    denominator=2, generator=torch.Generator().manual_seed(0), noise_mode="seeded")
    big_part = 1.0 / (10.0 * 1000 ** 0.5) * 10.0  # clipped to norm 1
    assert out.state["head"][0].item() == pytest.approx((big_part + 0.001) / 2, rel=1e-5)
    assert out.clip_fraction == 0.5
    assert out.update_norms[0] == pytest.approx(10 * 1000 ** 0.5, rel=1e-6)


def test_noise_on_the_sum_has_std_sigma_times_clip():
    base = _state(0.0, n=200_000)
    out = dp_fedavg(base, [], ["head"], clip=0.5, noise_multiplier=2.0, denominator=4,
                    generator=torch.Generator().manual_seed(1), noise_mode="seeded")
    std_of_sum = (out.state["head"] * 4).std().item()
    assert std_of_sum == pytest.approx(2.0 * 0.5, rel=0.01)


def test_values_outside_the_released_keys_are_ignored():
    base = _state(0.0)
    rogue = {"head": torch.zeros(1000), "frozen": torch.full((3,), 99.0)}
    out = dp_fedavg(base, [rogue], ["head"], clip=1.0, noise_multiplier=0.0, denominator=1,
                    generator=torch.Generator().manual_seed(0), noise_mode="seeded")
    assert torch.equal(out.state["frozen"], base["frozen"])
