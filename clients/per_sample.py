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
Opacus' own per-layer formulas (``GradSampleModule.GRAD_SAMPLERS``; its
``functorch`` fallback for a layer it has no formula for). Ghost norms (the
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
(``tests/clients/test_dp_engine.py``) check that both give the per-sample,
clipped and noised gradients of Opacus' hooks on the same batch and noise.

Both work for any ``nn.Module`` that Opacus' ``ModuleValidator`` accepts (no
BatchNorm, whose batch statistics mix samples) and whose trained parameters sit
in modules that return one tensor; ``TorchFunc`` also needs a forward that is an
ordinary function of its input (no in-place buffer update).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fl.tasks.base import Task


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


class BookKeeping:
    """Sets ``p.grad_sample`` of every trained parameter of ``model`` from one
    backward pass over the trained layers' outputs."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        check_module(model)
        self.task, self.model = task, model
        self.layers = trained_layers(model)
        self.params = [p for m in self.layers for p in m.parameters(recurse=False)
                       if p.requires_grad]

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients of ``batch``; returns the batch's mean loss."""
        if len(batch[0]) == 0:
            return _empty_batch(self.params)
        calls: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor]] = []
        with self._recording(calls):
            loss = self.task.device_loss(self.model, *batch)
        output_grads = torch.autograd.grad(loss, [out for _, _, out in calls])
        n = len(batch[0])
        samples: dict[nn.Parameter, torch.Tensor] = {}
        for (layer, inputs, _), grad_out in zip(calls, output_grads):
            # Opacus' formulas give per-sample gradients of the *sum* of losses;
            # the task's loss is the batch mean (Opacus' loss_reduction="mean").
            for param, gs in self._sampler(layer)(layer, inputs, grad_out * n).items():
                samples[param] = samples[param] + gs if param in samples else gs
        for p in self.params:
            p.grad_sample = samples[p]
        return loss.detach()

    @staticmethod
    def _sampler(layer: nn.Module):
        if type(layer) is nn.Conv2d and layer.padding_mode == "zeros" \
                and not isinstance(layer.padding, str) and layer.weight.device.type == "cpu":
            return conv2d_grad_sample
        return GradSampleModule.GRAD_SAMPLERS.get(type(layer), ft_compute_per_sample_gradient)

    @contextmanager
    def _recording(self, calls: list):
        """During the forward pass: trained weights do not require grad (so
        autograd builds no weight-gradient step), and every call of a trained
        layer records its inputs and an output that the loss is differentiated by."""

        def record(layer: nn.Module, inputs: tuple, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{type(layer).__name__} returns {type(output).__name__}; "
                                "per-sample DP-SGD needs trained layers that return a tensor")
            if not output.requires_grad:  # nothing before it is trained: a new leaf
                output = output.detach().requires_grad_()
            calls.append((layer, [t.detach() for t in inputs if isinstance(t, torch.Tensor)],
                          output))
            return output

        handles = [m.register_forward_hook(record) for m in self.layers]
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

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        if len(batch[0]) == 0:
            return _empty_batch(self.params)
        grads, losses = self._per_sample({k: p.detach() for k, p in self.named.items()}, batch)
        for name, p in self.named.items():
            p.grad_sample = grads[name]
        return losses.mean()
