"""Canary photos for the photo-level one-run audit: what they look like, where
they go, and how the server scores them.

A canary is a photo that no face data set holds: a 4 x 4 grid of cells, each
one of the eight saturated colours of the RGB cube's corners, rebuilt from
``(seed, index)``: public, like the canaries of any audit (the adversary knows
what it is looking for; only the coins are secret). Uniform random pixels were
the first design and gave the server a weak signal (AUC 0.63 on the pretrained
swap generator without DP, 10 devices x 4 canaries, two local epochs): white
noise has the same second-order statistics whatever its seed, so the gradients
of the last decoder convolutions (which sum over pixel positions) of any two
noise canaries nearly coincide. Large flat cells of saturated colour with sharp
edges are as far from the faces as noise, and each grid's colour-and-edge
content differs, so each canary's gradient has a direction of its own (AUC 0.90
in the same setting; 0.92 for 8 x 8 cells, 0.77 for 4 x 4 cells of random, not
saturated, colours; docs/privacy.md "Empirical audit").

Placement (``place``) gives each device of the audit up to ``per_device`` canary
slots; each slot's canary is *in* by an independent fair coin drawn from the
operating system (``secrets``), never logged. ``with_canaries`` adds a device's
included canaries to its real photos, first dropping real photos so that the
device's Opacus batch count ``ceil(n / B)`` is the same whichever coins came up:
then DP-SGD's Poisson rate and step count, which the accountant treats as
public, do not depend on the coins, and flipping one coin is exactly the
accountant's add/remove-one-photo relation. (The photo *count* a device reports
does change; fedface treats it as public and outside the photo-level guarantee,
docs/privacy.md, and the audit's adversary does not read it.)

The score (``score_update``) is the server's white-box test: how much of minus
each canary's gradient at the weights the server sent (the personal part at its
public initial value, which is what a device starts from) the device's unit
update holds, by least squares on all of the device's canary directions at once
(``presence``). SGD moves the weights along minus the gradient of the photos it
trained on, so an included canary pulls the update towards it; summed over
every round the device trained in.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fl.audit.inversion import train_only
from fl.data.device_data import DeviceData
from fl.privacy.plan import opacus_batches

CANARY_PREFIX = "audit-canary-"
# Public faces whose gradients stand in for a device's own photos. Measured without
# DP on the pretrained swap generator (8 devices x 7 canaries, one participation):
# AUC 0.67 with 8, 0.92 with 32, 0.99 with 64 and 96 (48/48 right). One set per
# round: it depends only on the weights sent.
NUISANCE_FACES = 96


CANARY_CELLS = 4  # a canary is CANARY_CELLS x CANARY_CELLS cells of saturated colour


def canary_photo(seed: int, index: int, image_size: int) -> np.ndarray:
    """Canary ``index``: ``(3, S, S)`` float32, a ``CANARY_CELLS``-square grid whose
    cells are each one of the 8 saturated colours (every channel 0 or 1)."""
    rng = np.random.default_rng([seed, 0xC4, index])
    cells = rng.integers(0, 2, (3, CANARY_CELLS, CANARY_CELLS)).astype(np.float32)
    rows = np.arange(image_size) * CANARY_CELLS // image_size  # cell of each pixel row
    return np.ascontiguousarray(cells[:, rows][:, :, rows])


@dataclass(frozen=True)
class Placement:
    """Which canary slots each device holds (public) and which canaries are in
    (``included``: the auditor's secret coins, indexed like the canaries)."""

    seed: int  # rebuilds the canaries' pixels (public)
    slots: Mapping[int, tuple[int, ...]]  # device -> canary indices it may hold
    included: np.ndarray  # bool per canary index

    @property
    def canaries(self) -> int:
        return len(self.included)

    def device_of(self) -> dict[int, int]:
        return {c: d for d, cs in self.slots.items() for c in cs}

    def included_on(self, device: int) -> tuple[int, ...]:
        return tuple(c for c in self.slots.get(device, ()) if self.included[c])

    def public(self) -> Placement:
        """The placement without the coins (what the scorer may see)."""
        return replace(self, included=np.zeros(0, dtype=bool))


def secret_coins(count: int) -> np.ndarray:
    """Fair coins from the operating system's randomness; nothing can rebuild them."""
    bits = secrets.randbits(count) if count else 0
    return np.array([(bits >> i) & 1 for i in range(count)], dtype=bool)


def place(devices: Sequence[int], per_device: int, batch_size: int, seed: int,
          coins: np.ndarray | None = None) -> Placement:
    """``per_device`` canary slots on each of ``devices``; ``coins`` default to
    ``secret_coins`` (tests pass their own)."""
    if not 1 <= per_device < batch_size:
        raise ValueError(f"audit canaries per device must be in 1..{batch_size - 1} "
                         f"(local.batch_size - 1), got {per_device}: more would change the "
                         "device's Opacus batch count with the coins")
    slots = {int(d): tuple(range(i * per_device, (i + 1) * per_device))
             for i, d in enumerate(devices)}
    count = per_device * len(slots)
    coins = secret_coins(count) if coins is None else np.asarray(coins, dtype=bool)
    if coins.shape != (count,):
        raise ValueError(f"need {count} coins, got {coins.shape}")
    return Placement(seed, slots, coins)


def real_photos_kept(n: int, slots: int, batch_size: int, photos_max: int) -> int:
    """How many of a device's ``n`` real photos to keep so that with any number
    ``j`` in ``0..slots`` of canaries added, ``opacus_batches(kept + j)`` is the
    same and ``kept + slots <= photos_max`` (the photo-level delta stays valid)."""
    for kept in range(min(n, photos_max - slots), 0, -1):
        if len({opacus_batches(kept + j, batch_size) for j in range(slots + 1)}) == 1:
            return kept
    raise ValueError(f"a device with {n} photos cannot hold {slots} canaries at batch size "
                     f"{batch_size} and data.photos_max={photos_max}")


def with_canaries(data: DeviceData, placement: Placement, device: int, image_size: int,
                  batch_size: int, photos_max: int) -> DeviceData:
    """``data`` with this device's included canaries added to its training photos
    (held-out photos untouched); devices without slots are returned as they are."""
    slots = placement.slots.get(device, ())
    if not slots or data.excluded or len(data.train) == 0:
        return data
    kept = real_photos_kept(len(data.train), len(slots), batch_size, photos_max)
    chosen = placement.included_on(device)
    extra = np.stack([canary_photo(placement.seed, c, image_size) for c in chosen]) \
        if chosen else np.zeros((0, *data.train.shape[1:]), np.float32)
    controls = data.train_controls
    if controls is not None:  # canaries get the neutral controls of the first photo
        controls = np.concatenate([controls[:kept], np.repeat(controls[:1], len(chosen), 0)])
    return replace(data, train=np.concatenate([data.train[:kept], extra]),
                   train_ids=data.train_ids[:kept] + tuple(f"{CANARY_PREFIX}{c}" for c in chosen),
                   train_controls=controls)


def unit_gradient(task, model: nn.Module, batch: tuple[torch.Tensor, ...],
                  keys: Sequence[str]) -> np.ndarray:
    """Minus the gradient of the device loss on one photo w.r.t. ``keys`` (the
    device-trained shared weights), flattened in sorted key order and scaled to
    unit norm: the direction one SGD step on that photo moves the update."""
    wanted = train_only(model, keys)
    loss = task.device_loss(model, *batch)
    grads = torch.autograd.grad(loss, wanted)
    flat = -torch.cat([g.reshape(-1) for g in grads]).to(torch.float64).numpy()
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 0 else flat


def alignment(update: np.ndarray, direction: np.ndarray) -> float:
    """cos(update, direction); 0 for an empty update."""
    norm = np.linalg.norm(update)
    return float(update @ direction / norm) if norm > 0 else 0.0


def trained_keys(task, state: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, v in state.items() if task.is_device_trained(k)
                  and v.is_floating_point())


def nuisance_directions(task, model: nn.Module, sent: Mapping[str, torch.Tensor],
                        personal_init: Mapping[str, torch.Tensor], image_size: int,
                        extra: Iterable[torch.Tensor] = ()) -> np.ndarray:
    """The public faces' unit directions at the weights sent (``(NUISANCE_FACES, d)``):
    the same for every device of a round, so a scorer computes them once."""
    keys = trained_keys(task, sent)
    model.load_state_dict({**sent, **personal_init}, strict=False)
    return np.stack([unit_gradient(task, model, (torch.from_numpy(face)[None], *extra), keys)
                     for face in public_faces(image_size)])


def score_update(task, model: nn.Module, placement: Placement, device: int,
                 sent: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                 personal_init: Mapping[str, torch.Tensor], image_size: int,
                 extra: Iterable[torch.Tensor] = (),
                 nuisance: np.ndarray | None = None) -> dict[int, float]:
    """Each of ``device``'s canary slots scored against one update it sent: its
    ``presence`` coefficient in ``received - sent``. ``extra`` is appended to the
    canary's batch (e.g. a task's controls for the portrait); ``nuisance`` is
    ``nuisance_directions`` at ``sent`` when the caller has it already."""
    keys = trained_keys(task, sent)
    if nuisance is None:
        nuisance = nuisance_directions(task, model, sent, personal_init, image_size, extra)
    model.load_state_dict({**sent, **personal_init}, strict=False)
    update = np.concatenate([(received[k].to(torch.float64) - sent[k].to(torch.float64))
                             .reshape(-1).numpy() for k in keys])
    slots = placement.slots.get(device, ())
    if not slots:
        return {}
    directions = np.stack([
        unit_gradient(task, model, (torch.from_numpy(
            canary_photo(placement.seed, c, image_size))[None], *extra), keys)
        for c in slots])
    return dict(zip(slots, presence(update, directions, nuisance)))


@lru_cache(maxsize=4)
def public_faces(image_size: int, count: int = NUISANCE_FACES) -> np.ndarray:
    """Public SynthFaces renders: stand-ins for the device's own photos, whose
    gradients the server cannot know but can approximate."""
    from fl.data.fleet import FleetSpec, public_attributes, public_identity
    from fl.data.synthfaces import render

    spec = FleetSpec(image_size=image_size)
    return np.concatenate([render(public_identity(spec, k), [public_attributes(spec, k, 0)],
                                  image_size) for k in range(count)]).astype(np.float32)


def presence(update: np.ndarray, directions: np.ndarray,
             nuisance: np.ndarray | None = None) -> list[float]:
    """How much of each direction the unit update holds: least-squares
    coefficients of the update on all of a device's canary directions at once.

    Canaries of random pixels share much of their gradient (their mean colour,
    say), so a canary left out scores high on its cosine alone when its
    neighbours on the same device are in; regressing on all of them together
    credits each only with what is its own."""
    norm = np.linalg.norm(update)
    if norm == 0:
        return [0.0] * len(directions)
    basis = directions if nuisance is None else np.concatenate([directions, nuisance])
    coef, *_ = np.linalg.lstsq(basis.T, update / norm, rcond=None)
    return [float(c) for c in coef[:len(directions)]]


@torch.no_grad()
def loss_drop(task, model: nn.Module, placement: Placement, device: int,
              sent: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor],
              personal_init: Mapping[str, torch.Tensor], image_size: int) -> dict[int, float]:
    """Each of ``device``'s canary slots scored by how much one update lowered
    its loss (the loss test of membership inference): device loss at the weights
    sent minus at the weights received, both with the public personal part."""
    slots = placement.slots.get(device, ())
    if not slots:
        return {}
    photos = torch.from_numpy(np.stack([canary_photo(placement.seed, c, image_size)
                                        for c in slots]))
    model.eval()
    out = {}
    for state, sign in ((sent, 1.0), ({**sent, **received}, -1.0)):
        model.load_state_dict({**state, **personal_init}, strict=False)
        for c, photo in zip(slots, photos):
            out[c] = out.get(c, 0.0) + sign * float(task.device_loss(model, photo[None]))
    return out

