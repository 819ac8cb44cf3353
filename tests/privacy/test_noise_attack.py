"""The attack a reviewer ran on fedface: rebuild the server's user-level noise
from public values and subtract it from two consecutive released models.

The adversary knows what MLflow shows (the run's ``seed`` param, the round,
the config: clip, noise multiplier, cohort k) and the models released after
rounds r-1 and r. Under ``privacy.noise=seeded`` it regenerates the noise the
server drew and recovers the exact sum of the clipped updates: with one device
in the round, that device's update, with no noise at all. Under ``secure`` the
same computation is off by the full noise.
"""

from __future__ import annotations

import pytest
import torch

from fl.privacy import noise as N
from fl.privacy.plan import UserPlan
from fl.privacy.release import DeviceUpdate, DpFedAvgRelease
from fl.privacy.user_level import UserMechanism

SEED, ROUND, K_COHORT, CLIP, SIGMA = 7, 5, 4, 0.05, 1.0


def _attack(previous: dict[str, torch.Tensor], released: dict[str, torch.Tensor],
            keys: list[str]) -> dict[str, torch.Tensor]:
    """What the adversary computes: k * (model_r - model_{r-1}) - rebuilt noise."""
    generator = N.generator(N.SEEDED, SEED, ROUND)  # public seed and round
    return {k: (released[k].double() - previous[k].double()) * K_COHORT
            - N.gaussian(previous[k].shape, SIGMA * CLIP, generator, N.SEEDED) for k in keys}


@pytest.mark.parametrize("noise,recovered", [("seeded", True), ("secure", False)])
def test_rebuilding_the_noise_recovers_an_update_only_when_seeded(noise, recovered):
    torch.manual_seed(0)
    previous = {"decoder.a": torch.randn(500), "decoder.b": torch.randn(30, 10)}
    mechanism = UserMechanism(SIGMA, CLIP, "poisson", 100, K_COHORT, 1e-3)
    plan = UserPlan(True, mechanism, fleet_population=100, fleet_cohort=K_COHORT)
    release = DpFedAvgRelease(plan, lambda key: True, noise, SEED)
    # One device's update: the secret the adversary wants (norm below the clip).
    secret = {k: 1e-3 * torch.randn_like(v) for k, v in previous.items()}
    update = {k: previous[k] + secret[k] for k in previous}
    out = release.release(ROUND, previous, [DeviceUpdate(1, update)])

    guess = _attack(previous, out.state, list(previous))
    error = torch.sqrt(sum(((guess[k] - secret[k].double()) ** 2).sum() for k in secret))
    secret_norm = torch.sqrt(sum((v.double() ** 2).sum() for v in secret.values()))
    noise_norm = SIGMA * CLIP * (sum(v.numel() for v in secret.values())) ** 0.5
    if recovered:
        # float32 rounding of the released model is all that is left
        assert error < 1e-3 * secret_norm
    else:
        assert error > 0.5 * noise_norm > 10 * secret_norm
