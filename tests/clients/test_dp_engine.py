"""fedface's per-sample gradient engines against Opacus' own (the reference).

The engines (``clients.per_sample``) replace only how per-sample gradients are
computed; Opacus' DP optimizer still clips, noises and accounts. So it is enough,
and necessary, that they hand it the same per-sample gradients as Opacus'
``GradSampleModule`` on the same batch, for the fedface models and for modules
of other shapes, and that a whole DP-SGD participation with the same noise ends
at the same weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from clients.per_sample import BookKeeping, TorchFunc
from clients.trainer import OWN_ENGINES, TRAINED, set_trainable, train_on_device
from fl.data.device_data import load_device_data
from fl.data.fleet import FleetSpec
from fl.privacy.ledger import PhotoLedger
from fl.protocol import Recipe
from fl.tasks import get_task

SPEC = FleetSpec(num_devices=4, photos_min=12, photos_max=12, heldout_photos=2, image_size=32)
ENGINE_CLASSES = [BookKeeping, TorchFunc]


def _opacus_grad_samples(loss_fn, model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """Per-sample gradients as Opacus' hooks compute them (loss_reduction="mean")."""
    gsm = GradSampleModule(model)
    try:
        loss_fn(gsm, *batch).backward()
        return {n: p.grad_sample.clone() for n, p in model.named_parameters()
                if p.requires_grad}
    finally:
        gsm._close()
        for p in model.parameters():
            p.grad = None


def _engine_grad_samples(engine_class, task, model, batch) -> dict[str, torch.Tensor]:
    engine = engine_class(task, model)
    engine(*batch)
    return {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(ours: dict, reference: dict) -> None:
    """Equal up to float rounding, on the scale of the whole gradient (what the
    joint clipping sees: a conv bias before GroupNorm has a true gradient of 0,
    and rounding residues of 1e-9 there)."""
    assert ours.keys() == reference.keys()
    scale = max(ref.abs().max().item() for ref in reference.values())
    for name, ref in reference.items():
        assert ours[name].shape == ref.shape, name
        assert torch.allclose(ours[name], ref, rtol=1e-4, atol=1e-5 * scale), name


def _task_batch(name: str):
    params = {"name": name, "width": 8}
    if name == "portrait":
        params["adapter"] = True
    task = get_task(params)
    model = task.build_model(32)
    set_trainable(task, model)
    torch.manual_seed(0)
    for p in model.parameters():  # away from the zero init, so every gradient is non-trivial
        p.data += 0.05 * torch.randn_like(p)
    data = load_device_data(dataclasses.replace(SPEC, source="synthfaces"), 1)
    if task.needs_controls and data.train_controls is None:
        pytest.skip("this data source gives no portrait controls")
    batch = tuple(t[:5] for t in task.training_tensors(data))
    return task, model, batch


@pytest.mark.parametrize("engine_class", ENGINE_CLASSES)
@pytest.mark.parametrize("task_name", ["swap", "portrait"])
def test_per_sample_gradients_equal_opacus_hooks_on_the_fedface_models(engine_class,
                                                                       task_name):
    task, model, batch = _task_batch(task_name)
    reference = _opacus_grad_samples(task.device_loss, model, batch)
    ours = _engine_grad_samples(engine_class, task, model, batch)
    _assert_same(ours, reference)
    assert all(g.abs().sum() > 0 for g in ours.values())


class _OddModel(nn.Module):
    """Shapes fedface's models do not have: a layer called twice (its per-sample
    gradients add up), LayerNorm, a trained layer before a frozen one, and a
    module with a bare parameter that Opacus has no formula for (its functorch
    fallback)."""

    class Scale(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.scale = self.Scale(6)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        h = self.first(self.frozen(h))  # the same trained layer again
        return self.scale(self.norm(h))


class _RegressionTask:
    def device_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("engine_class", ENGINE_CLASSES)
def test_per_sample_gradients_equal_opacus_hooks_on_other_module_shapes(engine_class):
    torch.manual_seed(1)
    model = _OddModel()
    batch = (torch.randn(7, 6), torch.randn(7, 6))
    task = _RegressionTask()
    reference = _opacus_grad_samples(task.device_loss, model, batch)
    _assert_same(_engine_grad_samples(engine_class, task, model, batch), reference)
    assert model.first.weight.requires_grad  # the engine gives back what it switched off


@pytest.mark.parametrize("engine_class", ENGINE_CLASSES)
def test_an_empty_poisson_batch_gives_empty_per_sample_gradients(engine_class):
    task, model, batch = _task_batch("swap")
    engine = engine_class(task, model)
    loss = engine(*(t[:0] for t in batch))
    assert torch.isnan(loss)
    for p in engine.params:
        assert p.grad_sample.shape == (0, *p.shape)


@pytest.mark.parametrize("engine_class", ENGINE_CLASSES)
def test_a_model_opacus_cannot_train_privately_is_refused(engine_class):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        engine_class(_RegressionTask(), model)


@pytest.mark.parametrize("engine", sorted(OWN_ENGINES))
def test_a_whole_dp_sgd_participation_ends_where_opacus_hooks_end(engine):
    """Same photos, recipe and seeded generator: the same Poisson batches and the
    same noise, so the weights after clipping, noising and stepping agree with
    Opacus' hooks to float precision, and so do steps, loss and accounting."""
    task = get_task({"name": "swap", "width": 8})
    photos = (torch.from_numpy(load_device_data(SPEC, 1).train),)
    recipe = Recipe(local_epochs=2.0, batch_size=4, lr_shared=0.5, lr_personal=5.0,
                    noise_multiplier=0.3, max_grad_norm=0.05, delta=1e-3)
    start = task.build_model(32).state_dict()
    results = {}
    for name in (engine, "opacus-hooks"):
        model = task.build_model(32)
        model.load_state_dict(start)
        ledger = PhotoLedger()
        outcome = train_on_device(task, model, photos, recipe, ledger, engine=name)
        assert outcome.status == TRAINED
        results[name] = (model.state_dict(), outcome, ledger.events)
    (ours, ours_out, ours_events), (ref, ref_out, ref_events) = results.values()
    assert ours_events == ref_events and ours_out.steps == ref_out.steps
    assert ours_out.loss == pytest.approx(ref_out.loss, rel=1e-5)
    assert ours_out.epsilon == ref_out.epsilon
    moved = max((ref[k] - start[k]).abs().max().item() for k in ref)
    assert moved > 1e-3  # training did move the weights
    for key in ref:
        assert torch.allclose(ours[key], ref[key], atol=1e-6, rtol=1e-5), key
