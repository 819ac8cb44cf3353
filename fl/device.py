"""Which torch device fedface computes on: the ``device`` key.

``auto`` (the default) picks the first CUDA GPU when torch sees one and the CPU
otherwise; ``cpu``, ``cuda`` and ``cuda:N`` ask for one. Pretraining, on-device
training, evaluation, the new-user check and ``experiments.generate`` put their
models there. What stays where it was: photos are decoded and kept on the CPU
(a batch moves when it is used), metrics are computed on the CPU, checkpoints
and replies hold CPU tensors, and DP noise is drawn on the device of the
gradient it is added to, from a generator seeded as ``privacy.noise`` says
(``clients.trainer``).

Task code (losses, metrics, sample grids) builds its tensors on the CPU and
calls the model's modules directly. ``place`` lets it run unchanged on any
device: a call from outside the model moves its tensor arguments to the device
and its result back to the CPU (both differentiable), while calls between the
model's own modules stay on the device. This module imports only torch: a
device process loads it (``tests/clients/test_light_import.py``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

CHOICES = "auto | cpu | cuda | cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceUnavailable(ValueError):
    """The ``device`` asked for is not a device, or not on this machine."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _PATTERN.match(name):
        raise DeviceUnavailable(f"device={name!r} is not a device: use {CHOICES}")
    return name


def resolve(name: str) -> torch.device:
    """The torch device for ``name``; a clear error if it is not on this machine."""
    check_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = ("this torch is a CPU-only build (torch.version.cuda is None)"
                     if torch.version.cuda is None else "torch sees no CUDA GPU "
                     "(check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise DeviceUnavailable(
                f"device={name} but {build}. Use device=cpu or device=auto (CUDA when "
                "available), or install a CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailable(f"device={name} but this machine has {count} CUDA "
                                    f"device(s): use cuda:0..cuda:{count - 1}")
    return device


def _move(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


class _Placement:
    """Counts nested module calls so that only the outermost one moves tensors:
    to where the called module's weights are now (so a later ``.cpu()`` or
    ``.to()`` of the model is followed), and its result back to the CPU."""

    def __init__(self) -> None:
        self.depth = 0

    def before(self, module, args, kwargs):
        self.depth += 1
        device = _device_of(module) if self.depth == 1 else None
        if device is not None:
            return _move(args, device), _move(kwargs, device)
        return args, kwargs

    def after(self, module, args, kwargs, output):
        self.depth -= 1
        if self.depth == 0:
            return _move(output, torch.device("cpu"))
        return output


def place(device: torch.device, *modules: nn.Module) -> None:
    """Move ``modules`` to ``device`` and let CPU callers use them unchanged.

    The modules share one call counter, so a model and a separate embedding
    table that a loss feeds into it (pretraining's public identities) behave as
    one. The hooks stay for the modules' lifetime (models here are built per
    use) and follow the modules if they move again; on the CPU they move nothing.
    """
    placement = _Placement()
    for module in modules:
        module.to(device)
        for sub in module.modules():
            sub.register_forward_pre_hook(placement.before, with_kwargs=True)
            sub.register_forward_hook(placement.after, with_kwargs=True, always_call=True)
