"""On-device fine-tuning under Opacus DP-SGD (photo-level differential privacy).

Which parameters are trained, and how, decides what the photo-level guarantee
covers. A device trains two groups on its photos:

* the **device-trained shared weights** (e.g. the decoder), which leave the
  device as the round's update, and
* the **personal part** (the identity embedding), which stays on the device but
  shapes every later update it sends: next round's shared gradients are computed
  *through* it.

If the personal part were fitted without DP on the same photos, it would carry
unbounded information about each photo into every later shared update, and no
epsilon reported for those updates would be true. So both groups are trained by
**one** DP-SGD optimizer, with per-sample gradients clipped *jointly* over all
trainable parameters and Gaussian noise added to all of them; they only differ
in learning rate (param groups). The accountant then bounds everything derived
from the photos. Frozen parameters (e.g. the shared encoder) see the photos only
in forward passes whose outputs feed the clipped gradients.

Plain SGD rather than Adam: Adam divides each coordinate by its running RMS,
which blows DP noise on low-signal coordinates up to full-size steps and erodes
a pretrained model (measured while planning fedface; see docs/privacy.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl.privacy.ledger import PhotoLedger
from fl.protocol import Recipe
from fl.tasks.base import Task

TRAINED, BUDGET_EXHAUSTED, NO_PHOTOS = "trained", "budget_exhausted", "no_photos"
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class Outcome:
    status: str
    steps: int = 0
    loss: float = float("nan")
    epsilon: float = 0.0
    sample_rate: float = 0.0


def personal_lr(recipe: Recipe, previous_participations: int) -> float:
    """Step size of the personal part in this participation.

    With ``personal_lr_decay`` the k-th participation uses ``lr_personal / k``, a
    Robbins-Monro schedule: each participation's DP noise is averaged out by the
    later ones instead of accumulating as a random walk (measured: 24.4 dB vs
    23.3 dB swap PSNR after 3 participations; docs/privacy.md).
    """
    if not recipe.personal_lr_decay:
        return recipe.lr_personal
    return recipe.lr_personal / (previous_participations + 1)


def set_trainable(task: Task, model: nn.Module) -> tuple[list, list]:
    """Freeze everything except the personal part and the device-trained shared
    weights; return (personal params, device-trained shared params)."""
    personal, shared = [], []
    for name, param in model.named_parameters():
        if task.is_personal(name):
            personal.append(param)
        elif task.is_device_trained(name):
            shared.append(param)
        param.requires_grad_(task.is_personal(name) or task.is_device_trained(name))
    return personal, shared


def train_on_device(task: Task, model: nn.Module, tensors: tuple[torch.Tensor, ...],
                    recipe: Recipe, ledger: PhotoLedger) -> Outcome:
    """Fine-tune ``model`` in place on ``tensors`` (``task.training_tensors``: one
    row per photo); record DP steps in ``ledger``.

    Under photo-level DP the device first computes the epsilon it *would* reach
    after this round; if that passes its budget it does not train at all, so a
    device never exceeds its budget however often it is sampled.
    """
    if len(tensors[0]) == 0:
        return Outcome(NO_PHOTOS, epsilon=ledger.epsilon(recipe.delta))
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    personal, shared = set_trainable(task, model)
    groups = [{"params": personal, "lr": personal_lr(recipe, ledger.participations)}]
    if shared:
        groups.append({"params": shared, "lr": recipe.lr_shared})
    optimizer = OPTIMIZERS[recipe.optimizer](groups)
    loader = DataLoader(TensorDataset(*tensors), batch_size=recipe.batch_size, shuffle=True,
                        generator=generator)
    model.train()

    if not recipe.photo_dp:
        steps = max(1, math.ceil(recipe.local_epochs * len(loader)))
        loss = _run_steps(task, model, optimizer, loader, steps)
        ledger.participations += 1  # no DP events: the ledger only counts rounds
        return Outcome(TRAINED, steps=steps, loss=loss)

    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off; the simulation does not need a
        # CSPRNG, and a deployment can turn it on (documented in docs/privacy.md).
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant=ledger.accountant)
        engine.accountant.history = list(ledger.events)
        dp_model, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=recipe.noise_multiplier, max_grad_norm=recipe.max_grad_norm,
            poisson_sampling=True, noise_generator=generator,
        )
    sample_rate = 1.0 / len(loader)  # exactly the rate Opacus hands its accountant
    steps = max(1, round(recipe.local_epochs * len(loader)))
    try:
        if not ledger.admits(recipe.noise_multiplier, sample_rate, steps, recipe.delta,
                             recipe.budget_epsilon):
            return Outcome(BUDGET_EXHAUSTED, epsilon=ledger.epsilon(recipe.delta),
                           sample_rate=sample_rate)
        loss = _run_steps(task, dp_model, dp_optimizer, dp_loader, steps)
    finally:
        dp_model._close()  # remove Opacus' hooks: the plain model stays reusable
    ledger.record(engine.accountant.history)
    return Outcome(TRAINED, steps=steps, loss=loss, epsilon=ledger.epsilon(recipe.delta),
                   sample_rate=sample_rate)


def _run_steps(task: Task, model: nn.Module, optimizer, loader, steps: int) -> float:
    """Exactly ``steps`` optimizer steps, cycling the loader; mean non-empty loss."""
    losses, done = [], 0
    # With a frozen encoder no module *input* requires grad, so torch warns that
    # Opacus' full backward hooks fire on outputs only; that is what we want.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    while done < steps:
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = task.device_loss(model, *batch)
            loss.backward()
            optimizer.step()  # empty Poisson batches still take a noised, accounted step
            if len(batch[0]):
                losses.append(loss.item())
            done += 1
            if done == steps:
                break
    return float(sum(losses) / len(losses)) if losses else float("nan")
