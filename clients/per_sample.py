"""Per-sample gradients of the trained parameters, for Opacus' DP optimizer.

Why not Opacus' ``GradSampleModule`` (``grad_sample_mode="hooks"``): a device
trains a small part of the model (the personal embedding and the last decoder
layers, about 12k parameters), and the hooks let autograd compute the ordinary
summed gradient of every trained weight as well as the per-sample one, which is
then thrown away. ``BookKeeping`` does what the Book-Keeping method (Bu et al.
2023, "Differentially private optimization on large model at small cost") does
to avoid it: one backward pass computes only the gradients of the trained
layers' *outputs* (autograd never forms a weight gradient), and each layer's
per-sample gradients come from its stored input and output gradient, with
Opacus' own per-layer formulas (``GradSampleModule.GRAD_SAMPLERS``; for a layer
it has no formula for, ``own_parameters_sampler``: ``vmap(grad)`` of that layer's
own parameters, on all its tensor inputs). Ghost norms (the
other half of Book-Keeping) would cost more here: a 3x3 convolution at 32x32
has T = 1024 positions, and a ghost norm costs T^2 per sample against the
explicit gradient's T * weights. ``experiments/bench/local_step.py`` measures
every engine.

``TorchFunc`` is the other candidate the benchmark measures: ``vmap(grad(..))``
over the batch through the whole model, for the trained parameters only.

Everything else in DP-SGD stays Opacus': the gradients are handed to Opacus'
``DPOptimizer`` as ``p.grad_sample`` (its ``no_op`` grad-sample mode exists for
this), which clips them jointly to ``max_grad_norm``, adds the Gaussian noise
from the run's generator, and drives the accountant. Reference tests
(``tests/clients/test_dp_engine.py``) check that both give the per-sample
gradients of ``torch.func`` (written in the test) and of Opacus' hooks, and that a
whole participation ends where Opacus' hooks do with the same batches and noise.

What each needs of the model: Opacus' ``ModuleValidator`` accepts it (no
BatchNorm, whose batch statistics mix samples), and the task's loss is the mean
of per-photo losses with no randomness in the forward pass (no dropout).
``TorchFunc`` is then correct by construction: it differentiates the task's
loss of a one-photo batch. ``BookKeeping`` further assumes what it cannot see:
that dim 0 of every trained layer's input and output is the photo, and that a
trained parameter is used only inside its own module's call (positionally
called, returning one tensor). A model that breaks this (a layer over
positions-first ``(T, B, d)`` tensors, a weight also used by ``F.linear`` outside
its module) would get per-sample rows that are not per photo, which Opacus would
then clip as if they were. So ``BookKeeping`` checks itself and refuses
(``EngineMismatch``) rather than train on them: on every batch, every trained
parameter's per-sample gradient and every recorded layer input must have exactly
one row per photo; and on the first batch of at least ``CHECK_ROWS`` photos it
compares its rows for the first ``CHECK_ROWS`` photos with ``TorchFunc``'s on the
same photos, per parameter. That check costs one ``TorchFunc`` pass over two
photos (65-175 ms on one CPU thread for fedface's 32 px models, about one step's
time), once per model structure per process (``_structure``: task, classes,
parameter names, shapes and trained-ness, a photo's shape), not once per step.
A rows-that-mix-photos layer either has a dim 0 other than the batch size (the
row count check) or, by chance equal to it, rows that differ from TorchFunc's
(the comparison). Checked shapes (``tests/clients/test_dp_engine.py``): the
swap and portrait models with their trained parts, Linear, Conv2d, GroupNorm,
LayerNorm, Embedding, a layer called twice, tied weights, a module with a bare
parameter, one with both a bare parameter and a trained child.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fl.tasks.base import Task

# How many photos of the first batch ``BookKeeping`` checks against ``TorchFunc``,
# and how close (per parameter: relative to that parameter's reference, plus a
# floor relative to the joint per-sample norm for parameters whose true gradient
# is ~0, such as a conv bias just before GroupNorm). The mistakes it exists for
# are O(1) relative errors (0.5 to 1.4 in the review's cases).
CHECK_ROWS = 2
CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-5


# Model structures (``BookKeeping._structure``) whose check passed in this process.
_VERIFIED: set[tuple] = set()


class EngineMismatch(RuntimeError):
    """``BookKeeping``'s per-sample gradients are not per photo for this model."""


def trained_layers(model: nn.Module) -> list[nn.Module]:
    """Modules that own (not through a submodule) a parameter that requires grad."""
    return [m for m in model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


def check_module(model: nn.Module) -> None:
    """Opacus' own check of what DP-SGD can train (BatchNorm, for one, cannot)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"{type(model).__name__} cannot be trained with per-sample DP-SGD: "
                         + "; ".join(str(e) for e in errors)
                         + " (opacus.validators.ModuleValidator.fix replaces such layers)")


def _empty_batch(params: list[nn.Parameter]) -> torch.Tensor:
    """An empty Poisson batch: no per-sample gradient (the optimizer still adds
    its noise and accounts the step)."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    return torch.tensor(float("nan"))


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d on the CPU: the weight's by the
    convolution's own weight-gradient kernel, one sample at a time.

    Opacus' formula unfolds the input (kernel-area times the input's size per
    sample) and contracts it with an einsum; on the CPU that costs 1.1x (32 px)
    to 7x (64 px) this loop (``experiments/bench/local_step.py``). On a GPU the
    unfolded einsum is one kernel, and Opacus' formula is used.
    """
    inputs = activations[0].to(backprops.dtype)
    ret = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = torch.stack([
            torch.ops.aten.convolution_backward(
                backprops[i:i + 1], inputs[i:i + 1], layer.weight, None, layer.stride,
                layer.padding, layer.dilation, False, [0, 0], layer.groups,
                [False, True, False])[1]
            for i in range(len(inputs))])
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))
    return ret


def own_parameters_sampler(layer: nn.Module, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``layer``'s *own* trained parameters, for a layer
    Opacus has no formula for: ``vmap(grad)`` of ``<layer(inputs_i), grad_out_i>``.

    Opacus' fallback (``ft_compute_per_sample_gradient``) would differentiate every
    parameter under ``layer`` (counting a trained child's twice, since the child's
    own call is recorded too) and pass it only the first input."""
    own = {name: p.detach() for name, p in layer.named_parameters(recurse=False)
           if p.requires_grad}

    def inner(params, inputs, grad_out):
        out = functional_call(layer, params, tuple(t.unsqueeze(0) for t in inputs))
        return (out * grad_out.unsqueeze(0)).sum()

    grads = vmap(grad(inner), in_dims=(None, 0, 0))(own, tuple(activations), backprops)
    params = dict(layer.named_parameters(recurse=False))
    return {params[name]: g for name, g in grads.items()}


def _compare(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    """Names (and relative errors) of parameters whose rows differ from the reference."""
    joint = torch.sqrt(sum(ref.double().pow(2).sum() for ref in reference.values())).item()
    bad = []
    for name, ref in reference.items():
        err = (ours[name].double() - ref.double()).norm().item()
        scale = ref.double().norm().item()
        if not err <= CHECK_RTOL * scale + CHECK_ATOL * joint:
            bad.append(f"{name} (relative error {err / max(scale, 1e-30):.3g})")
    return bad


class BookKeeping:
    """Sets ``p.grad_sample`` of every trained parameter of ``model`` from one
    backward pass over the trained layers' outputs."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        check_module(model)
        self.task, self.model = task, model
        self.layers = trained_layers(model)
        self.params = [p for m in self.layers for p in m.parameters(recurse=False)
                       if p.requires_grad]
        self.names = {p: name for name, p in model.named_parameters() if p.requires_grad}
        self._reference = TorchFunc(task, model)
        self.checked = False  # against TorchFunc, on the first non-empty batch

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients of ``batch``; returns the batch's mean loss.
        Raises ``EngineMismatch`` where they would not be one row per photo."""
        if len(batch[0]) == 0:
            return _empty_batch(self.params)
        calls: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor]] = []
        with self._recording(calls):
            loss = self.task.device_loss(self.model, *batch)
        output_grads = torch.autograd.grad(loss, [out for _, _, out in calls])
        n = len(batch[0])
        samples: dict[nn.Parameter, torch.Tensor] = {}
        with torch.no_grad():  # per-sample gradients are values, not graphs
            for (layer, inputs, _), grad_out in zip(calls, output_grads):
                for t in (*inputs, grad_out):
                    if t.dim() == 0 or len(t) != n:
                        raise EngineMismatch(
                            f"{self._layer_name(layer)} ({type(layer).__name__}) sees a tensor "
                            f"of shape {tuple(t.shape)} in a batch of {n} photos: bookkeeping "
                            "needs dim 0 of every trained layer's input and output to be the "
                            "photo. Train this model with engine='torch-func'.")
                # Opacus' formulas give per-sample gradients of the *sum* of losses;
                # the task's loss is the batch mean (Opacus' loss_reduction="mean").
                for param, gs in self._sampler(layer)(layer, inputs, grad_out * n).items():
                    samples[param] = samples[param] + gs if param in samples else gs
        for p in self.params:
            if p not in samples or samples[p].shape != (n, *p.shape):
                raise EngineMismatch(
                    f"{self.names[p]}: per-sample gradient of shape "
                    f"{tuple(samples[p].shape) if p in samples else None} for {n} photos "
                    f"(needs {(n, *p.shape)}). Train this model with engine='torch-func'.")
            p.grad_sample = samples[p]
        if not self.checked:
            key = self._structure(batch)
            if key not in _VERIFIED:
                self._check(batch)
                if n < CHECK_ROWS:  # one photo cannot show rows that mix photos
                    return loss.detach()
                _VERIFIED.add(key)
            self.checked = True
        return loss.detach()

    def _structure(self, batch: tuple[torch.Tensor, ...]) -> tuple:
        """What the check's verdict depends on: task, model class, every module's
        name and class, every parameter's name, shape and whether it is trained,
        and the shape of one photo's row."""
        return (type(self.task), type(self.model),
                tuple((name, type(m)) for name, m in self.model.named_modules()),
                tuple((name, tuple(p.shape), p.requires_grad)
                      for name, p in self.model.named_parameters()),
                tuple((tuple(t.shape[1:]), t.dtype) for t in batch))

    def _check(self, batch: tuple[torch.Tensor, ...]) -> None:
        """Refuse unless the first ``CHECK_ROWS`` rows equal ``TorchFunc``'s per-sample
        gradients of the same photos (correct by construction: it differentiates
        the loss of a one-photo batch). Catches rows that mix photos (a layer whose
        dim 0 is not the photo, by chance as long as the batch) and parameters used
        where the recording does not see them."""
        rows = tuple(t[:CHECK_ROWS] for t in batch)
        reference = self._reference.per_sample(*rows)[0]
        ours = {name: p.grad_sample[:CHECK_ROWS] for p, name in self.names.items()}
        bad = _compare(ours, {name.removeprefix("model."): g for name, g in reference.items()})
        if bad:
            raise EngineMismatch(
                f"bookkeeping's per-sample gradients of {type(self.model).__name__} differ "
                f"from torch.func's on the same photos for {', '.join(bad)}: the model "
                "breaks an assumption of bookkeeping (see clients.per_sample). Refusing to "
                "train on them; train this model with engine='torch-func'.")

    def _layer_name(self, layer: nn.Module) -> str:
        return next((name for name, m in self.model.named_modules() if m is layer), "?") \
            or type(self.model).__name__

    @staticmethod
    def _sampler(layer: nn.Module):
        if type(layer) is nn.Conv2d and layer.padding_mode == "zeros" \
                and not isinstance(layer.padding, str) and layer.weight.device.type == "cpu":
            return conv2d_grad_sample
        if any(layer.children()):  # a formula would not tell its parameters from its children's
            return own_parameters_sampler
        return GradSampleModule.GRAD_SAMPLERS.get(type(layer), own_parameters_sampler)

    @contextmanager
    def _recording(self, calls: list):
        """During the forward pass: trained weights do not require grad (so
        autograd builds no weight-gradient step), and every call of a trained
        layer records its inputs and an output that the loss is differentiated by."""

        def record(layer: nn.Module, inputs: tuple, kwargs: dict, output):
            if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
                raise EngineMismatch(f"{self._layer_name(layer)} is called with a tensor "
                                     "keyword argument; bookkeeping records positional inputs "
                                     "only. Train this model with engine='torch-func'.")
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{type(layer).__name__} returns {type(output).__name__}; "
                                "per-sample DP-SGD needs trained layers that return a tensor")
            if not output.requires_grad:  # nothing before it is trained: a new leaf
                output = output.detach().requires_grad_()
            calls.append((layer, [t.detach() for t in inputs if isinstance(t, torch.Tensor)],
                          output))
            return output

        handles = [m.register_forward_hook(record, with_kwargs=True) for m in self.layers]
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.params:
                p.requires_grad_(True)  # Opacus' formulas compute only these
            for handle in handles:
                handle.remove()


class _DeviceLoss(nn.Module):
    """``task.device_loss(model, *batch)`` as a module, so that ``functional_call``
    can swap the trained parameters while the task still sees the real model."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task, self.model = task, model

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.task.device_loss(self.model, *batch)


class TorchFunc:
    """Sets ``p.grad_sample`` with ``vmap(grad(loss of one sample))``; the loss of
    one sample is the task's mean loss on a batch of that one row."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        check_module(model)
        loss_module = _DeviceLoss(task, model)
        self.named = {f"model.{name}": p for name, p in model.named_parameters()
                      if p.requires_grad}
        self.params = list(self.named.values())

        def sample_loss(params: dict[str, torch.Tensor],
                        row: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return functional_call(loss_module, params, tuple(t.unsqueeze(0) for t in row))

        # randomness="different": a model with dropout draws it per sample, as a batch would.
        self._per_sample = vmap(grad_and_value(sample_loss), in_dims=(None, 0),
                                randomness="different")

    def per_sample(self, *batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample gradients (by ``model.<parameter name>``) and losses of ``batch``."""
        return self._per_sample({k: p.detach() for k, p in self.named.items()}, batch)

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        if len(batch[0]) == 0:
            return _empty_batch(self.params)
        grads, losses = self.per_sample(*batch)
        for name, p in self.named.items():
            p.grad_sample = grads[name]
        return losses.mean()
