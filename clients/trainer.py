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

Where the randomness comes from (``dp_generator``) is the other half of the
guarantee: noise that the server can rebuild protects nothing against it. One
generator drives both the Gaussian noise and the Poisson sampling masks;
``privacy.noise`` decides whether it is seeded from public values (a
reproducible simulation) or from the operating system (``fl.privacy.noise``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.per_sample import BookKeeping, TorchFunc
from fl.privacy import noise
from fl.privacy.ledger import PhotoLedger, accountant_state, events_of
from fl.privacy.steps import opacus_batches, phase_plan, phase_steps_of
from fl.protocol import Recipe
from fl.tasks.base import Task

TRAINED, BUDGET_EXHAUSTED, NO_PHOTOS = "trained", "budget_exhausted", "no_photos"
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}

# How per-sample gradients are computed (``clients.per_sample``); clipping, noise and
# accounting are Opacus' DPOptimizer and accountant in every engine. "bookkeeping"
# was the fastest at 32 and 64 px (docs/results.md); the others stay for the
# benchmark and the reference tests. Opacus' engines: its grad_sample_mode values.
OWN_ENGINES = {"bookkeeping": BookKeeping, "torch-func": TorchFunc}
OPACUS_ENGINES = {"opacus-hooks": "hooks", "opacus-functorch": "functorch", "opacus-ew": "ew"}
ENGINES = (*OWN_ENGINES, *OPACUS_ENGINES)
DEFAULT_ENGINE = "bookkeeping"


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

    With ``personal_lr_noise_scaled`` and photo-level DP, the step is divided by
    the noise multiplier when it is above 1, so the noise each step adds to the
    32-number embedding stays that of noise 1: at the noise a tight budget needs
    (5.45 for epsilon 1) the unscaled step threw the personal part below the
    pretrained one (15.1 against 17.6 dB; scaled: 19.7; docs/results.md).
    """
    lr = recipe.lr_personal
    if recipe.personal_lr_noise_scaled and recipe.photo_dp:
        lr /= max(recipe.noise_multiplier, 1.0)
    if not recipe.personal_lr_decay:
        return lr
    return lr / (previous_participations + 1)


def set_trainable(task: Task, model: nn.Module, personal: bool = True,
                  shared: bool = True) -> tuple[list, list]:
    """Freeze everything except the personal part and/or the device-trained shared
    weights; return (personal params, device-trained shared params) being trained."""
    trained_personal, trained_shared = [], []
    for name, param in model.named_parameters():
        is_personal, is_shared = task.is_personal(name), task.is_device_trained(name)
        train = (personal and is_personal) or (shared and is_shared)
        param.requires_grad_(train)
        if train:
            (trained_personal if is_personal else trained_shared).append(param)
    return trained_personal, trained_shared


def phases(task: Task, model: nn.Module, recipe: Recipe) -> list[tuple[float, bool, bool]]:
    """The participation's training phases: (epochs, trains personal, trains shared)
    (``fl.privacy.steps.phase_plan``, which the server's calibration counts).

    With ``personal_epochs`` the personal part is fitted alone first, then the
    shared weights alone on top of it. Why: under one joint clip the shared
    weights' per-photo gradients (thousands of coordinates) take nearly all of the
    clipping norm, and the 32-number identity embedding learns only noise
    (measured: 18.6 dB after two participations jointly, 21.0 dB with the
    embedding alone, docs/results.md). Without it, one joint phase as before.
    Both phases are DP-SGD at the same noise multiplier and sampling rate, so the
    accountant sees one participation of their summed steps.
    """
    trains_shared = any(task.is_device_trained(n) for n, _ in model.named_parameters())
    return phase_plan(recipe.local_epochs, recipe.personal_epochs, trains_shared)


def dp_generator(recipe: Recipe, server_round: int = 0, device: int = 0) -> torch.Generator:
    """The one generator of a device's training run: its DP noise, its Poisson
    sampling masks (Opacus' DP loader reuses the loader's generator) and, without
    photo-level DP, its shuffling.

    ``secure``: seeded from the operating system (``fl.privacy.noise``); nothing
    public (the recipe's seed, the round, the device) enters it and nothing of it
    is stored or sent, so neither the server nor anyone reading MLflow can
    rebuild the noise. torch's global generator is left alone.
    ``seeded``: seeded from ``hash((recipe.seed, server_round, device))``, and
    torch's global generator with it, exactly as fedface always has, so a
    simulation stays reproducible to the last digit (and comparable with
    earlier results). Its noise is public to whoever knows the seed.
    """
    if noise.check_mode(recipe.noise) == noise.SECURE:
        return noise.generator(noise.SECURE)
    seed = hash((recipe.seed, server_round, device)) % 2**31
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def noise_generator(recipe: Recipe, sampler: torch.Generator,
                    device: torch.device) -> torch.Generator:
    """The generator of the DP noise, on the device of the gradients it is added to.

    On the CPU it is the sampler's own generator, as always. On a GPU the noise
    needs a generator there (the Poisson masks stay on the CPU): under ``secure``
    a second one seeded from the operating system, under ``seeded`` one seeded
    from the sampler's public seed.
    """
    if device.type == "cpu":
        return sampler
    if noise.check_mode(recipe.noise) == noise.SECURE:
        return noise.generator(noise.SECURE, device=device)
    return torch.Generator(device=device).manual_seed(sampler.initial_seed())


def train_on_device(task: Task, model: nn.Module, tensors: tuple[torch.Tensor, ...],
                    recipe: Recipe, ledger: PhotoLedger,
                    generator: torch.Generator | None = None,
                    engine: str = DEFAULT_ENGINE) -> Outcome:
    """Fine-tune ``model`` in place on ``tensors`` (``task.training_tensors``: one
    row per photo); record DP steps in ``ledger``.

    ``generator`` is the run's randomness (``dp_generator``; by default that of
    round 0 of device 0: direct callers such as tests and benchmarks).
    ``engine`` computes the per-sample gradients (``ENGINES``; benchmarks and
    reference tests pick others). Training runs where ``model`` is (``fl.device``):
    each batch moves there, and so does the DP noise (``noise_generator``).
    Under photo-level DP the device first computes the epsilon it *would* reach
    after this round; if that passes its budget it does not train at all, so a
    device never exceeds its budget however often it is sampled.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {list(ENGINES)}")
    if len(tensors[0]) == 0:
        return Outcome(NO_PHOTOS, epsilon=ledger.epsilon(recipe.delta))
    if generator is None:
        generator = dp_generator(recipe)
    plan = phases(task, model, recipe)
    loader = DataLoader(TensorDataset(*tensors), batch_size=recipe.batch_size, shuffle=True,
                        generator=generator)
    model.train()
    device = next(model.parameters()).device

    if not recipe.photo_dp:
        steps, loss = 0, float("nan")
        for epochs, personal, shared in plan:
            n = max(1, math.ceil(epochs * len(loader)))
            optimizer = _optimizer(task, model, recipe, ledger, personal, shared)
            loss = _run_steps(_backward(task, model), optimizer, loader, n, device)
            steps += n
        ledger.participations += 1  # no DP events: the ledger only counts rounds
        return Outcome(TRAINED, steps=steps, loss=loss)

    # Opacus hands its accountant 1 / len(dp_loader), and len(dp_loader) is
    # int(1 / (1 / len(loader))), one less than len(loader) for some photo counts
    # (93 -> 92: 737..744 photos at batch 8; never below 737 at batch 8). The budget
    # is checked for exactly that rate and the step count taken from the same length
    # (``opacus_batches``), for all phases together, before any of them trains.
    batches = opacus_batches(len(tensors[0]), recipe.batch_size)
    sample_rate = 1.0 / batches
    phase_steps = [phase_steps_of(epochs, batches) for epochs, _, _ in plan]
    planned = (recipe.noise_multiplier, sample_rate, sum(phase_steps))
    if not ledger.admits(*planned, recipe.delta, recipe.budget_epsilon):
        return Outcome(BUDGET_EXHAUSTED, epsilon=ledger.epsilon(recipe.delta),
                       sample_rate=sample_rate)
    noise_gen = noise_generator(recipe, generator, device)
    history, loss = ledger.events, float("nan")
    for (epochs, personal, shared), steps in zip(plan, phase_steps):
        optimizer = _optimizer(task, model, recipe, ledger, personal, shared)
        privacy, dp_model, dp_optimizer, dp_loader = _make_private(
            model, optimizer, loader, recipe, ledger.accountant, history, noise_gen, engine)
        try:
            per_sample = OWN_ENGINES[engine](task, model) if engine in OWN_ENGINES \
                else _backward(task, dp_model)
            loss = _run_steps(per_sample, dp_optimizer, dp_loader, steps, device)
        finally:
            dp_model._close()  # remove Opacus' hooks: the plain model stays reusable
        history = events_of(privacy.accountant)
    ledger.record(history, planned)  # refuses any other rate or step count
    return Outcome(TRAINED, steps=sum(phase_steps), loss=loss,
                   epsilon=ledger.epsilon(recipe.delta), sample_rate=sample_rate)


def _optimizer(task: Task, model: nn.Module, recipe: Recipe, ledger: PhotoLedger,
               personal: bool, shared: bool):
    """The phase's optimizer over what it trains (``set_trainable``): one param
    group per part, each with its own step size."""
    personal_params, shared_params = set_trainable(task, model, personal, shared)
    groups = []
    if personal_params:
        groups.append({"params": personal_params,
                       "lr": personal_lr(recipe, ledger.participations)})
    if shared_params:
        groups.append({"params": shared_params, "lr": recipe.lr_shared})
    return OPTIMIZERS[recipe.optimizer](groups)


def _make_private(model: nn.Module, optimizer, loader: DataLoader, recipe: Recipe,
                  accountant: str, history: list, generator: torch.Generator, engine: str):
    """Opacus' DP-SGD around ``model``, its ``accountant`` loaded with ``history``
    (the ledger's events, and those of this participation's earlier phases).

    ``generator`` is the noise generator; on the CPU it is also (through
    ``loader``) the Poisson sampler's. Under ``privacy.noise=secure`` the DP optimizer also draws noise
    in Opacus' secure mode (robust to floating-point attacks); the engine itself
    cannot be made secure here (it needs ``torchcsprng``; ``fl.privacy.noise``).
    fedface's own engines compute ``p.grad_sample`` themselves: Opacus wraps the
    model in its ``no_op`` module and does the rest as always.
    """
    with warnings.catch_warnings():
        # Only this warning is silenced: fedface's secure mode replaces Opacus'
        # (fl.privacy.noise), and under "seeded" the caveat is reported per run.
        # Every other warning raised inside make_private (a changed dataset, a
        # module Opacus cannot handle as asked) says something about the DP run
        # and stays visible.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        privacy = PrivacyEngine(accountant=accountant)
        privacy.accountant.load_state_dict(accountant_state(history, accountant))
        dp_model, dp_optimizer, dp_loader = privacy.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=recipe.noise_multiplier, max_grad_norm=recipe.max_grad_norm,
            poisson_sampling=True, noise_generator=generator,
            grad_sample_mode=OPACUS_ENGINES.get(engine, "no_op"),
        )
    dp_optimizer.secure_mode = recipe.noise == noise.SECURE
    return privacy, dp_model, dp_optimizer, dp_loader


def _backward(task: Task, model: nn.Module):
    """One batch's gradients by an ordinary backward pass (non-private training,
    and Opacus' own engines, whose hooks collect the per-sample gradients)."""

    def step(*batch: torch.Tensor) -> torch.Tensor:
        loss = task.device_loss(model, *batch)
        loss.backward()
        return loss.detach()

    return step


def _run_steps(gradients, optimizer, loader, steps: int, device: torch.device) -> float:
    """Exactly ``steps`` optimizer steps, cycling the loader; mean non-empty loss.
    ``gradients(*batch)`` leaves the batch (moved to ``device``)'s gradients where
    ``optimizer`` reads them and returns its loss."""
    losses, done = [], 0
    with warnings.catch_warnings():
        # With a frozen encoder no module *input* requires grad, so torch warns that
        # Opacus' full backward hooks fire on outputs only; that is what we want.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        while done < steps:
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = gradients(*(t.to(device) for t in batch))
                optimizer.step()  # empty Poisson batches still take a noised, accounted step
                if len(batch[0]):
                    losses.append(loss.item())
                done += 1
                if done == steps:
                    break
    return float(sum(losses) / len(losses)) if losses else float("nan")
