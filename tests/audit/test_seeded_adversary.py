"""A second planted bug: an adversary that knows the noise seed under
``privacy.noise=seeded`` (docs/privacy.md: seeded noise protects only against
parties that do not know the seed, an MLflow param). The server replays each
device's DP-SGD run with the public seed on dummy photos, records every noise draw
Opacus makes (one generator drives the Poisson masks and the noise, and how many
numbers the masks take depends only on the photo count, so it tries each count the
canary coins allow and keeps the best fit), subtracts the rebuilt noise from the
update, then scores the canaries as usual. Its lower bound must exceed the theory:
the accountant's sigma protected nothing against it. The same server without the
seed (the raw update) stays at or below it.

Measured (8 devices x 7 canaries, sigma 8, seeded): fit 0.9995 of the update's
energy explained by the rebuilt noise; theory 0.48 at delta 1e-5; without the seed
29/48 right, bound 0.0; with it 48/48, bound 2.11 (ceiling 2.27). ~20 s."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from clients.trainer import train_on_device
from fl.audit import canary_photos as CP
from fl.audit import one_run
from fl.config import compose, fleet_spec, recipe, task_params
from fl.data.device_data import load_device_data
from fl.privacy.ledger import PhotoLedger, epsilon_of
from fl.privacy.plan import privacy_plan
from fl.tasks import get_task

DELTA = 1e-5
DEVICES, PER_DEVICE = 8, 7


@contextlib.contextmanager
def _recording_noise(model: torch.nn.Module, drawn: dict[str, torch.Tensor]):
    """Sum, per parameter name, every noise sample Opacus draws while training ``model``."""
    from opacus.optimizers import optimizer as opacus_optimizer

    original = opacus_optimizer._generate_noise
    params = dict(model.named_parameters())

    def record(std, reference, generator=None, secure_mode=False):
        noise = original(std, reference, generator, secure_mode)
        name = next(k for k, p in params.items() if getattr(p, "summed_grad", None) is reference)
        drawn[name] = drawn.get(name, 0) + noise.detach().clone()
        return noise

    opacus_optimizer._generate_noise = record
    try:
        yield
    finally:
        opacus_optimizer._generate_noise = original


def _flat(state, keys):
    return torch.cat([state[k].reshape(-1).float() for k in keys])


def _denoised(task, spec, r, start_state, update, keys, counts):
    """``update`` minus the best-fitting rebuilt noise over the candidate photo counts."""
    best = (-1.0, update)
    for n in counts:
        replay = task.build_model(spec.image_size)
        replay.load_state_dict(start_state)
        dummy = torch.zeros((n, 3, spec.image_size, spec.image_size))
        drawn: dict[str, torch.Tensor] = {}
        with _recording_noise(replay, drawn):
            train_on_device(task, replay, (dummy,), r, PhotoLedger(accountant="rdp"))
        noise = torch.cat([drawn[k].reshape(-1) for k in keys])
        scale = float(update @ noise / (noise @ noise))
        explained = float((update @ noise) ** 2 / (noise @ noise) / (update @ update))
        if explained > best[0]:
            best = (explained, update - scale * noise)
    return best


def test_an_adversary_that_knows_the_seed_beats_the_theory(tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith(("local.batch_size", "fleet.num", "local.personal_epochs"))] \
        + ["local.batch_size=8", "fleet.num_devices=8", "privacy=photo",
           "privacy.photo.noise_multiplier=8.0", "privacy.noise=seeded",
           "local.personal_epochs=0"]  # the one-phase game of test_photo_canaries' ``base``
    coins = np.random.default_rng(11).random(DEVICES * PER_DEVICE) < 0.5
    torch.manual_seed(0)
    cfg = compose(base)
    plan, task, spec = privacy_plan(cfg), get_task(task_params(cfg)), fleet_spec(cfg)
    r = recipe(cfg, plan.photo)
    placement = CP.place(list(range(DEVICES)), PER_DEVICE, r.batch_size, seed=3, coins=coins)
    start = task.build_model(spec.image_size)
    start_state = {k: v.clone() for k, v in start.state_dict().items()}
    sent = task.shared_state(start)
    personal = task.personal_state(start)
    keys = CP.trained_keys(task, sent)
    scores, raw, theory, fits = {}, {}, 0.0, []
    nuisance = CP.nuisance_directions(task, task.build_model(spec.image_size), sent, personal,
                                      spec.image_size)  # once: every device got ``sent``
    for device in range(DEVICES):
        real = load_device_data(spec, device)
        data = CP.with_canaries(real, placement, device, spec.image_size, r.batch_size,
                                spec.photos_max)
        model = task.build_model(spec.image_size)
        model.load_state_dict(start_state)
        out = train_on_device(task, model, task.training_tensors(data), r,
                              PhotoLedger(accountant="rdp"))
        theory = max(theory, epsilon_of([(r.noise_multiplier, out.sample_rate, out.steps)],
                                        DELTA))
        received = task.shared_state(model)
        update = _flat(received, keys) - _flat(sent, keys)
        kept = CP.real_photos_kept(len(real.train), PER_DEVICE, r.batch_size, spec.photos_max)
        explained, clean = _denoised(task, spec, r, start_state, update, keys,
                                     range(kept, kept + PER_DEVICE + 1))
        fits.append(explained)
        cleaned, start_at = dict(sent), 0
        for k in keys:
            n = sent[k].numel()
            cleaned[k] = sent[k] + clean[start_at:start_at + n].reshape(sent[k].shape)
            start_at += n
        scores |= CP.score_update(task, task.build_model(spec.image_size), placement, device,
                                  sent, cleaned, personal, spec.image_size, nuisance=nuisance)
        raw |= CP.score_update(task, task.build_model(spec.image_size), placement, device,
                               sent, received, personal, spec.image_size, nuisance=nuisance)
    assert min(fits) > 0.99, fits  # the seed rebuilt (nearly) all of the update
    order = sorted(scores)
    blind = one_run.audit([raw[c] for c in order], coins[order], DELTA)
    seeing = one_run.audit([scores[c] for c in order], coins[order], DELTA)
    assert blind.epsilon_lower <= theory  # the same server without the seed: DP holds
    assert seeing.epsilon_lower > theory, (seeing.epsilon_lower, theory, seeing.guesses)
