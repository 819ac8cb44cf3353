"""On-device DP-SGD: what is trained, how it is accounted, and the budget."""

import dataclasses

import pytest
import torch

from clients.trainer import BUDGET_EXHAUSTED, TRAINED, personal_lr, train_on_device
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


def test_participations_are_counted_without_dp_too(setup):
    task, model, photos, recipe = setup
    ledger = PhotoLedger()
    train_on_device(task, model, photos, dataclasses.replace(recipe, photo_dp=False), ledger)
    assert ledger.participations == 1 and ledger.events == []
