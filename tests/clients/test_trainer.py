"""On-device DP-SGD: what is trained, how it is accounted, and the budget."""

import dataclasses

import pytest
import torch

from clients.trainer import BUDGET_EXHAUSTED, TRAINED, dp_generator, personal_lr, train_on_device
from fl.data.device_data import load_device_data
from fl.data.fleet import FleetSpec
from fl.privacy.ledger import PhotoLedger, epsilon_of
from fl.protocol import Recipe
from fl.tasks import get_task

SPEC = FleetSpec(num_devices=4, photos_min=12, photos_max=12, heldout_photos=2, image_size=32)


@pytest.fixture()
def setup():
    task = get_task({"name": "swap", "width": 8})
    model = task.build_model(32)
    photos = (torch.from_numpy(load_device_data(SPEC, 1).train),)
    recipe = Recipe(local_epochs=1.0, batch_size=4, lr_shared=0.05, lr_personal=1.0,
                    noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3)
    return task, model, photos, recipe


def _personal(task, model):
    return {k: v.clone() for k, v in task.personal_state(model).items()}


def test_dp_training_accounts_every_step_across_rounds(setup):
    task, model, photos, recipe = setup
    ledger = PhotoLedger()
    outcomes = [train_on_device(task, model, photos, recipe, ledger) for _ in range(3)]
    assert all(o.status == TRAINED for o in outcomes)
    q = 1 / 3  # 12 photos, expected batch 4 -> Opacus samples each photo with rate 1/3
    assert outcomes[0].sample_rate == pytest.approx(q)
    assert ledger.events == [(1.0, pytest.approx(q), 9)]
    assert outcomes[-1].epsilon == pytest.approx(epsilon_of([(1.0, q, 9)], 1e-3))
    assert outcomes[0].epsilon < outcomes[1].epsilon < outcomes[2].epsilon


def test_personal_part_is_trained_by_the_same_clipped_dp_sgd(setup):
    """Joint per-sample clipping bounds the personal part's movement too.

    With a clipping norm of 1e-6 and (almost) no noise, every trained parameter
    can move at most lr * steps * 1e-6. A personal part trained outside DP-SGD
    (the bug that would void photo-level DP for every later round) would move
    by orders of magnitude more.
    """
    task, model, photos, recipe = setup
    before = _personal(task, model)
    tiny = dataclasses.replace(recipe, max_grad_norm=1e-6, noise_multiplier=1e-9)
    outcome = train_on_device(task, model, photos, tiny, PhotoLedger())
    moved = max((task.personal_state(model)[k] - v).abs().max().item()
                for k, v in before.items())
    assert outcome.status == TRAINED
    assert moved <= tiny.lr_personal * outcome.steps * 1e-6 * 1.01

    # Control: the same steps without DP move the personal part far more.
    task2, model2 = task, task.build_model(32)
    before2 = _personal(task2, model2)
    train_on_device(task2, model2, photos, dataclasses.replace(recipe, photo_dp=False),
                    PhotoLedger())
    moved2 = max((task2.personal_state(model2)[k] - v).abs().max().item()
                 for k, v in before2.items())
    assert moved2 > 1000 * moved


def test_frozen_shared_weights_do_not_change(setup):
    task, model, photos, recipe = setup
    encoder = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    train_on_device(task, model, photos, recipe, PhotoLedger())
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in encoder.items())


def test_device_over_budget_does_not_train_and_spends_nothing(setup):
    task, model, photos, recipe = setup
    ledger = PhotoLedger()
    first = train_on_device(task, model, photos, recipe, ledger)
    budget = dataclasses.replace(recipe, budget_epsilon=first.epsilon * 1.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    events = list(ledger.events)
    outcome = train_on_device(task, model, photos, budget, ledger)
    assert outcome.status == BUDGET_EXHAUSTED
    assert ledger.events == events and ledger.participations == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert ledger.epsilon(1e-3) <= budget.budget_epsilon


def test_personal_step_size_decays_with_participations():
    recipe = Recipe(lr_personal=10.0)
    assert [personal_lr(recipe, k) for k in range(3)] == [10.0, 5.0, pytest.approx(10 / 3)]
    assert personal_lr(dataclasses.replace(recipe, personal_lr_decay=False), 5) == 10.0


def test_personal_step_size_is_divided_by_a_noise_multiplier_above_one():
    noisy = Recipe(lr_personal=10.0, noise_multiplier=4.0, personal_lr_decay=False)
    assert personal_lr(noisy, 0) == 2.5
    assert personal_lr(dataclasses.replace(noisy, noise_multiplier=0.5), 0) == 10.0
    assert personal_lr(dataclasses.replace(noisy, personal_lr_noise_scaled=False), 0) == 10.0
    assert personal_lr(dataclasses.replace(noisy, photo_dp=False), 0) == 10.0
    assert personal_lr(dataclasses.replace(noisy, personal_lr_decay=True), 1) == 1.25


def test_participations_are_counted_without_dp_too(setup):
    task, model, photos, recipe = setup
    ledger = PhotoLedger()
    train_on_device(task, model, photos, dataclasses.replace(recipe, photo_dp=False), ledger)
    assert ledger.participations == 1 and ledger.events == []


# --- where the noise comes from (privacy.noise) --------------------------------------

def _shared_update(task, start, photos, recipe):
    """Device-trained shared weights after one DP-SGD run from ``start``, as the
    ClientApp runs it in round 3 on device 1."""
    model = task.build_model(32)
    model.load_state_dict(start)
    outcome = train_on_device(task, model, photos, recipe, PhotoLedger(),
                              dp_generator(recipe, server_round=3, device=1))
    assert outcome.status == TRAINED
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if task.is_device_trained(n)}, outcome


def test_secure_noise_differs_by_the_noise_scale_and_seeded_noise_repeats(setup):
    """Same recipe, seed, round, device, photos and starting weights.

    Each step adds N(0, (sigma * C)^2) to the summed clipped gradients and divides by
    the expected batch B, so SGD moves every device-trained weight by noise of
    standard deviation lr * sigma * C / B per step, sqrt(T) * that over T steps, and
    two independent runs differ by sqrt(2) times that. The clipped gradients
    themselves (norm <= C over ~28k weights) add far less per weight.
    """
    task, model, photos, recipe = setup
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seeded = dataclasses.replace(recipe, noise="seeded")
    a, _ = _shared_update(task, start, photos, seeded)
    b, _ = _shared_update(task, start, photos, seeded)
    assert all(torch.equal(a[k], b[k]) for k in a)  # reproducible to the last bit

    secure = dataclasses.replace(recipe, noise="secure", seed=seeded.seed)
    torch.manual_seed(1234)
    c, outcome = _shared_update(task, start, photos, secure)
    d, _ = _shared_update(task, start, photos, secure)
    diff = torch.cat([(c[k] - d[k]).flatten() for k in c])
    batch = len(photos[0]) * outcome.sample_rate  # Opacus' expected batch size: 4
    expected = (2 * outcome.steps) ** 0.5 * recipe.lr_shared * recipe.noise_multiplier \
        * recipe.max_grad_norm / batch
    observed = diff.pow(2).mean().sqrt().item()
    assert 0.9 < observed / expected < 1.1, (observed, expected)  # measured: 0.99-1.01
    assert torch.initial_seed() == 1234  # secure runs leave torch's global seed alone


def test_two_phases_under_secure_noise_cannot_be_rebuilt_and_seeded_ones_repeat(setup):
    """The same attack on the two-phase recipe: the shared update (3 shared steps after
    6 personal ones) repeats bit for bit when seeded, and under secure noise two runs
    differ by the noise of its 3 shared steps, sqrt(2 * 3) * lr * sigma * C / B per
    weight: the personal phase neither reseeds nor replays the stream."""
    task, model, photos, recipe = setup
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seeded = dataclasses.replace(_phased(recipe), noise="seeded")
    a, _ = _shared_update(task, start, photos, seeded)
    b, _ = _shared_update(task, start, photos, seeded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    secure = dataclasses.replace(seeded, noise="secure")
    c, outcome = _shared_update(task, start, photos, secure)
    d, _ = _shared_update(task, start, photos, secure)
    diff = torch.cat([(c[k] - d[k]).flatten() for k in c])
    batch = len(photos[0]) * outcome.sample_rate
    expected = (2 * 3) ** 0.5 * recipe.lr_shared * recipe.noise_multiplier \
        * recipe.max_grad_norm / batch
    observed = diff.pow(2).mean().sqrt().item()
    assert outcome.steps == 9
    assert 0.9 < observed / expected < 1.1, (observed, expected)


def test_secure_noise_drives_noise_and_poisson_masks_with_one_os_seeded_generator(
        setup, monkeypatch):
    """Under secure the DP optimizer draws noise in Opacus' secure mode, and the
    Poisson sampler uses the same generator (not one seeded from public values)."""
    from opacus import PrivacyEngine

    made, original = [], PrivacyEngine.make_private

    def spy(self, **kwargs):
        out = original(self, **kwargs)
        made.append(out)
        return out

    monkeypatch.setattr(PrivacyEngine, "make_private", spy)
    task, _, photos, recipe = setup
    for mode in ("secure", "seeded"):
        train_on_device(task, task.build_model(32), photos,
                        dataclasses.replace(recipe, noise=mode), PhotoLedger())
    (_, secure_opt, secure_loader), (_, seeded_opt, seeded_loader) = made
    assert secure_opt.secure_mode and not seeded_opt.secure_mode
    assert secure_loader.batch_sampler.generator is secure_opt.generator is not None
    assert seeded_loader.batch_sampler.generator is seeded_opt.generator


# --- the sample rate the budget is checked for ---------------------------------------

N_PHOTOS = 744  # at batch 8: len(loader) = 93, but Opacus' DP loader has int(1/(1/93)) = 92


@pytest.fixture()
def many_photos():
    task = get_task({"name": "swap", "width": 8})
    photos = (torch.rand(N_PHOTOS, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    recipe = Recipe(local_epochs=2 / 92, batch_size=8, noise_multiplier=1.0,
                    max_grad_norm=1.0, delta=1e-5)  # two steps
    return task, photos, recipe


def test_the_budget_is_checked_for_the_rate_opacus_records(many_photos):
    task, photos, recipe = many_photos
    ledger = PhotoLedger()
    outcome = train_on_device(task, task.build_model(32), photos, recipe, ledger)
    assert outcome.status == TRAINED
    assert ledger.events == [(1.0, outcome.sample_rate, outcome.steps)]
    assert outcome.sample_rate == 1 / 92 and outcome.steps == 2


def test_a_device_at_744_photos_does_not_end_past_its_budget(many_photos):
    """A budget between the epsilon at rate 1/93 (what fedface used to check) and at
    1/92 (what Opacus records): one participation would pass it, so none is run."""
    task, photos, recipe = many_photos
    at_93, at_92 = (epsilon_of([(1.0, q, 2)], recipe.delta) for q in (1 / 93, 1 / 92))
    assert at_93 < at_92
    budget = dataclasses.replace(recipe, budget_epsilon=(at_93 + at_92) / 2)
    ledger = PhotoLedger()
    outcome = train_on_device(task, task.build_model(32), photos, budget, ledger)
    assert outcome.status == BUDGET_EXHAUSTED and ledger.events == []
    assert ledger.epsilon(recipe.delta) <= budget.budget_epsilon


def test_a_history_on_another_rate_than_checked_is_refused():
    ledger = PhotoLedger(events=[(1.0, 0.25, 8)], participations=1)
    with pytest.raises(RuntimeError, match="not the privacy checked"):
        ledger.record([(1.0, 0.25, 8), (1.0, 1 / 92, 2)], planned=(1.0, 1 / 93, 2))
    assert ledger.participations == 1


# --- Opacus' public accountant state, and its warnings -------------------------------

def test_the_ledger_enters_opacus_through_the_accountants_public_state(setup, monkeypatch):
    from opacus.accountants.accountant import IAccountant

    loaded, original = [], IAccountant.load_state_dict

    def spy(self, state_dict):
        loaded.append((self.mechanism(), list(state_dict["history"])))
        return original(self, state_dict)

    monkeypatch.setattr(IAccountant, "load_state_dict", spy)
    task, model, photos, recipe = setup
    ledger = PhotoLedger()
    for _ in range(2):
        train_on_device(task, model, photos, recipe, ledger)
    assert ("rdp", []) in loaded and ("rdp", [(1.0, 1 / 3, 3)]) in loaded  # the trainer
    loaded.clear()
    # The PRV epsilon is the accountant's, loaded from the ledger's public state; the
    # RDP one is Opacus' own RDP analysis on kept one-step curves, equal to its
    # accountant's to the last bit (tests/privacy/test_ledger.py), and loads nothing.
    epsilon_of([(1.0, 0.2, 7)], 1e-3, "prv")  # a value not memoised yet
    epsilon_of([(1.0, 0.2, 7)], 1e-3, "rdp")
    assert loaded == [("prv", [(1.0, 0.2, 7)])]
    # A ledger kept by one accountant is refused by another (Opacus checks it).
    from opacus.accountants import RDPAccountant
    with pytest.raises(ValueError, match="cannot be loaded"):
        RDPAccountant().load_state_dict(PhotoLedger(accountant="prv").state_dict())


def test_opacus_dp_warnings_inside_make_private_still_surface(setup, monkeypatch):
    """Only "Secure RNG turned off" is silenced (fedface has its own secure mode),
    and training leaves the process' warning filters as they were."""
    import warnings

    from opacus import PrivacyEngine

    original = PrivacyEngine._prepare_data_loader

    def warn_then_prepare(self, *args, **kwargs):
        warnings.warn("PrivacyEngine detected new dataset object", UserWarning)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrivacyEngine, "_prepare_data_loader", warn_then_prepare)
    task, model, photos, recipe = setup
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_on_device(task, model, photos, recipe, PhotoLedger())
    messages = [str(w.message) for w in caught]
    assert any("detected new dataset object" in m for m in messages)
    assert not any("Secure RNG turned off" in m for m in messages)
    assert warnings.filters == filters


# --- the personal phase (local.personal_epochs) ---------------------------------------

def _phased(recipe):
    return dataclasses.replace(recipe, personal_epochs=2.0, local_epochs=1.0)


def test_personal_then_shared_phase_is_accounted_as_one_participation_of_both(setup):
    """12 photos at batch 4: rate 1/3, 3 batches an epoch; 2 personal epochs (6 steps)
    then 1 shared epoch (3 steps) at one noise multiplier: one 9-step event per
    participation, checked against the budget before either phase trains."""
    task, model, photos, recipe = setup
    ledger = PhotoLedger()
    outcomes = [train_on_device(task, model, photos, _phased(recipe), ledger) for _ in range(2)]
    assert [o.steps for o in outcomes] == [9, 9]
    assert ledger.events == [(1.0, pytest.approx(1 / 3), 18)]
    assert outcomes[-1].epsilon == pytest.approx(epsilon_of([(1.0, 1 / 3, 18)], 1e-3))


def test_a_budget_that_admits_the_personal_phase_alone_admits_neither(setup):
    task, model, photos, recipe = setup
    personal_only = epsilon_of([(1.0, 1 / 3, 6)], 1e-3)
    both = epsilon_of([(1.0, 1 / 3, 9)], 1e-3)
    budget = dataclasses.replace(_phased(recipe), budget_epsilon=(personal_only + both) / 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ledger = PhotoLedger()
    assert train_on_device(task, model, photos, budget, ledger).status == BUDGET_EXHAUSTED
    assert ledger.events == [] and ledger.participations == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_each_phase_moves_only_its_part_and_each_is_clipped(setup):
    """Clip 1e-6 and (almost) no noise: each part can move at most its step size
    times its own phase's steps times 1e-6 (6 personal, 3 shared), so each phase is
    clipped DP-SGD over its own part only."""
    task, model, photos, recipe = setup
    tiny = dataclasses.replace(_phased(recipe), max_grad_norm=1e-6, noise_multiplier=1e-9)
    personal0, shared0 = _personal(task, model), _device_trained(task, model)
    outcome = train_on_device(task, model, photos, tiny, PhotoLedger())
    personal_moved = _moved(personal0, _personal(task, model))
    shared_moved = _moved(shared0, _device_trained(task, model))
    assert outcome.status == TRAINED
    assert 0 < personal_moved <= tiny.lr_personal * 6 * 1e-6 * 1.01
    assert 0 < shared_moved <= tiny.lr_shared * 3 * 1e-6 * 1.01

    # The shared phase does not touch the personal part: with no shared step size the
    # personal part ends exactly where the personal phase alone leaves it.
    a, b = task.build_model(32), task.build_model(32)
    b.load_state_dict(a.state_dict())
    no_shared = dataclasses.replace(_phased(recipe), lr_shared=0.0)
    alone = dataclasses.replace(recipe, personal_epochs=2.0, local_epochs=1.0)
    train_on_device(task, a, photos, no_shared, PhotoLedger(), dp_generator(recipe, 1, 1))
    solo = get_task({"name": "swap", "width": 8, "device_trains": []})
    train_on_device(solo, b, photos, alone, PhotoLedger(), dp_generator(recipe, 1, 1))
    assert all(torch.equal(v, _personal(task, b)[k]) for k, v in _personal(task, a).items())


def _device_trained(task, model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if task.is_device_trained(n)}


def _moved(before, after):
    return max((after[k] - v).abs().max().item() for k, v in before.items())
