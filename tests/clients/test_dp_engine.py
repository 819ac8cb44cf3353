"""fedface's per-sample gradient engines against two references.

The engines (``clients.per_sample``) replace only how per-sample gradients are
computed; Opacus' DP optimizer still clips, noises and accounts. So it is enough,
and necessary, that they hand it each photo's own gradient. The references:
``torch.func`` (``vmap(grad)`` of the task's loss of a one-photo batch, written
here, so correct by construction and sharing nothing with the engines' per-layer
formulas) and Opacus' ``GradSampleModule`` (its hooks share bookkeeping's
formulas and its dim-0-is-the-photo assumption, so it alone would not do). Models
that break bookkeeping's assumptions must be refused, never trained on rows that
are not per photo. A whole DP-SGD participation with the same noise ends at the
same weights as Opacus' hooks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn
from torch.func import functional_call, grad, vmap

from clients import per_sample
from clients.per_sample import BookKeeping, EngineMismatch, TorchFunc
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


class _LossOf(nn.Module):
    def __init__(self, loss_fn, model: nn.Module) -> None:
        super().__init__()
        self.loss_fn, self.m = loss_fn, model

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.m, *batch)


def _torch_func_grad_samples(loss_fn, model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """Each photo's gradient: ``vmap`` over photos of ``grad`` of the loss of a
    batch of that one photo (``functional_call`` swaps in the trained parameters)."""
    loss = _LossOf(loss_fn, model)
    trained = {f"m.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one_photo_loss(params, row):
        return functional_call(loss, params, tuple(t.unsqueeze(0) for t in row))

    grads = vmap(grad(one_photo_loss), in_dims=(None, 0))(trained, batch)
    return {n.removeprefix("m."): g for n, g in grads.items()}


def _engine_grad_samples(engine_class, task, model, batch) -> dict[str, torch.Tensor]:
    engine = engine_class(task, model)
    engine(*batch)
    return {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(ours: dict, reference: dict) -> None:
    """Equal up to float rounding, each parameter on its own scale (per photo:
    relative to that photo's gradient of that parameter), plus a floor of 1e-6 of
    the photo's joint gradient norm for parameters whose true gradient is ~0 (a
    conv bias just before GroupNorm: rounding residues of 1e-9 there)."""
    assert ours.keys() == reference.keys()
    joint = torch.sqrt(sum(ref.flatten(1).pow(2).sum(1) for ref in reference.values()))
    for name, ref in reference.items():
        assert ours[name].shape == ref.shape, name
        err = (ours[name] - ref).flatten(1).norm(dim=1)
        bound = 1e-4 * ref.flatten(1).norm(dim=1) + 1e-6 * joint
        assert (err <= bound).all(), (name, (err / ref.flatten(1).norm(dim=1)).max().item())


def _task_batch(name: str, trains: list[str] | None = None):
    params = {"name": name, "width": 8}
    if trains:
        params["device_trains"] = trains
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
@pytest.mark.parametrize("task_name,trains", [("swap", None), ("portrait", None),
                                              ("swap", ["decoder.blocks.3", "decoder.out"])])
def test_per_sample_gradients_equal_torch_func_and_opacus_hooks_on_the_fedface_models(
        engine_class, task_name, trains):
    task, model, batch = _task_batch(task_name, trains)
    ours = _engine_grad_samples(engine_class, task, model, batch)
    _assert_same(ours, _torch_func_grad_samples(task.device_loss, model, batch))
    _assert_same(ours, _opacus_grad_samples(task.device_loss, model, batch))
    assert all(g.abs().sum() > 0 for g in ours.values())
    # values, not graphs: nothing keeps this step's activations alive
    assert all(not g.requires_grad and g.grad_fn is None for g in ours.values())


def test_a_photos_per_sample_gradient_does_not_depend_on_the_other_photos():
    task, model, batch = _task_batch("swap")
    before = _engine_grad_samples(BookKeeping, task, model, batch)
    changed = tuple(t.clone() for t in batch)
    changed[0][3] = changed[0][3].flip(-1) * 0.5
    after = _engine_grad_samples(BookKeeping, task, model, changed)
    rest = [0, 1, 2, 4]
    for name in before:
        assert torch.allclose(after[name][rest], before[name][rest], rtol=1e-4, atol=1e-7), name
    assert not all(torch.allclose(after[name][3], before[name][3]) for name in before)


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


class _ParentWithChild(nn.Module):
    """A module that owns a trained parameter and has a trained child (Opacus'
    functorch fallback would count the child's gradient twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.gain


class _TwoInputs(nn.Module):
    """A bare parameter in a module with two tensor inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 6))

    def forward(self, h: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return h * self.weight * torch.tanh(style)


class _HandledShapes(nn.Module):
    """More shapes bookkeeping must get right: the above two, and weights tied
    across two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.parent = _ParentWithChild()
        self.two = _TwoInputs()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.parent(x)
        return self.b(torch.tanh(self.two(self.a(h), x)))


@pytest.mark.parametrize("engine_class", ENGINE_CLASSES)
@pytest.mark.parametrize("model_class", [_OddModel, _HandledShapes])
def test_per_sample_gradients_equal_torch_func_on_other_module_shapes(engine_class,
                                                                      model_class):
    torch.manual_seed(1)
    model = model_class()
    trained = [p for p in model.parameters() if p.requires_grad]
    batch = (torch.randn(7, 6), torch.randn(7, 6))
    task = _RegressionTask()
    ours = _engine_grad_samples(engine_class, task, model, batch)
    _assert_same(ours, _torch_func_grad_samples(task.device_loss, model, batch))
    if model_class is _OddModel:  # hooks double the child's gradient in _HandledShapes
        _assert_same(ours, _opacus_grad_samples(task.device_loss, model, batch))
    assert trained == [p for p in model.parameters() if p.requires_grad]  # given back


class _PositionsFirst(nn.Module):
    """A Linear over a positions-first ``(T, B, d)`` tensor (T = 2): dim 0 of its
    input is the position, so each of its "per-sample" rows is one position summed
    over all photos. With a batch of T photos the shapes look right."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.view(len(x), 2, 3).permute(1, 0, 2)
        seq = torch.cat([seq, seq], -1)
        return self.lin(seq).permute(1, 0, 2).reshape(len(x), -1)[:, :6]


class _PositionsFlattened(nn.Module):
    """A Linear shared over positions, on ``(B * T, d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(-1, 3)).reshape(len(x), 6)


class _WeightOutsideItsModule(nn.Module):
    """A trained weight also used outside its own module's call (bookkeeping
    records only the call)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + F.linear(x, self.a.weight)


class _KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(input=x)


@pytest.mark.parametrize("model_class,photos,says", [
    (_PositionsFirst, 2, "differ from torch.func"),  # T == batch size: only values show it
    (_PositionsFirst, 5, "shape"),
    (_PositionsFlattened, 5, "shape"),
    (_WeightOutsideItsModule, 5, "differ from torch.func"),
    (_KeywordCall, 5, "keyword"),
])
def test_bookkeeping_refuses_models_whose_rows_would_not_be_per_photo(model_class, photos,
                                                                       says):
    torch.manual_seed(2)
    model = model_class()
    batch = (torch.randn(photos, 6), torch.randn(photos, 6))
    for _ in range(2):  # a refusal is not remembered as a pass
        with pytest.raises(EngineMismatch, match=says):
            BookKeeping(_RegressionTask(), model)(*batch)
    # torch.func is right on all of them (what the error message advises)
    _assert_same(_engine_grad_samples(TorchFunc, _RegressionTask(), model, batch),
                 _torch_func_grad_samples(_RegressionTask().device_loss, model, batch))


def test_the_self_check_catches_a_wrong_per_layer_formula_on_a_fedface_model(monkeypatch):
    """Right shapes, wrong values (a conv formula off by 10%): refused, even for a
    model structure an earlier test already verified."""
    task, model, batch = _task_batch("swap")
    right = per_sample.conv2d_grad_sample

    def off(layer, activations, backprops):
        return {p: 1.1 * g for p, g in right(layer, activations, backprops).items()}

    monkeypatch.setattr(per_sample, "conv2d_grad_sample", off)
    monkeypatch.setattr(per_sample, "_VERIFIED", set())
    with pytest.raises(EngineMismatch, match="decoder.*conv.weight"):
        BookKeeping(task, model)(*batch)


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
