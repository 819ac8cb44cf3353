"""Gradient inversion by a curious server: rebuild a device's photos from its update.

Inverting Gradients (Geiping, Bauermeister, Droege and Moeller 2020), as
configured in JonasGeiping/breaching's ``attack/invertinggradients.yaml``: the
attacker optimises dummy photos so that the gradient they induce at the weights
the server sent points the same way as the observed update (cosine loss, since
the update's scale is the learning rate's and the step count's), plus total
variation (images are smooth), with Adam, pixels boxed to [0, 1]. breaching runs
24,000 iterations of signed Adam from noise; an audit affords a few hundred, so
fedface's attacker also uses what it has for free: it starts from the mean public
face (``BREACHING`` keeps the reference settings, ``reconstruct`` takes them).

What the update carries decides the rest: on the default config devices send only
the decoder's last convolutions, whose gradients sum over pixel positions, and the
attack does not beat the mean face even without DP; with the whole shared model
trained on one photo it recovers the photo (tests/audit/test_inversion.py).

What the attacker sees decides what it can do:

* no DP, or photo-level DP only: the device's own update (the server sees each);
* user-level DP (with or without photo-level): only the released aggregate of
  the round, as under secure aggregation, where one device's photos are mixed
  with the others' and with DP-FedAvg's noise.

The yardstick is the **mean public face**: the average of public SynthFaces
renders, which any attacker has for free. An attack that does not beat its PSNR
against the device's photos learnt nothing it could show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fl.metrics import psnr, ssim

# breaching's invertinggradients: Adam lr 0.1 on signed gradients, TV scale 0.2,
# lr cut tenfold at 3/8, 5/8, 7/8 of the steps. Made for 24,000 steps: at the few
# hundred an audit affords it stalls: on one photo's update of the whole width-8
# model it matched the gradient (cosine 0.97) with a wrong picture, ~10 dB. fedface's
# attacker uses the prior it has for free: it starts from the mean public face,
# plain Adam at lr 0.05, TV 0.1, no schedule (measured on the same update: 25.7 dB,
# 30.0 at width 32, against the mean face's 12.2).
BREACHING = {"learning_rate": 0.1, "tv_weight": 0.2, "signed": True, "schedule": True}
LEARNING_RATE = 0.05
TV_WEIGHT = 0.1


@dataclass(frozen=True)
class Inversion:
    """The best reconstruction (by PSNR against any of the device's photos)."""

    psnr: float
    ssim: float
    mean_face_psnr: float  # the mean public face against the same photos
    reconstructions: np.ndarray  # (b, 3, S, S)
    best: int  # index of the best reconstruction
    truth: np.ndarray  # (3, S, S): the photo it matched best
    seen: str  # "device update" | "released aggregate"


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (breaching's TV, exponent 1)."""
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    return dx + dy


def train_only(model: nn.Module, keys: Sequence[str]) -> list[nn.Parameter]:
    """Put ``model`` in eval mode with gradients on for ``keys`` only (the weights the
    device trains and sends, which is all the attacker's gradient can be about);
    returns those parameters in sorted key order, the order updates are flattened in."""
    params = dict(model.named_parameters())
    wanted = [params[k] for k in sorted(keys)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in wanted:
        p.requires_grad_(True)
    model.eval()
    return wanted


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def reconstruct(task, model: nn.Module, keys: Sequence[str],
                update: Mapping[str, torch.Tensor], images: int, image_size: int,
                steps: int, seed: int = 0, start: np.ndarray | None = None,
                tv_weight: float = TV_WEIGHT, learning_rate: float = LEARNING_RATE,
                signed: bool = False, schedule: bool = False) -> torch.Tensor:
    """``images`` dummy photos whose device-loss gradient w.r.t. ``keys`` at the
    model's current weights best matches minus ``update`` in direction, starting
    from uniform noise or from ``start`` (e.g. the mean public face) plus noise."""
    wanted = train_only(model, keys)
    target = -_flat([update[k].detach().float() for k in sorted(keys)])
    target = target / target.norm().clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((images, 3, image_size, image_size), generator=generator)
    if start is not None:
        x = (torch.from_numpy(np.asarray(start, np.float32)) + 0.1 * (x - 0.5)).clamp(0, 1)
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=learning_rate)
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)] if schedule else []
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        grads = torch.autograd.grad(task.device_loss(model, x), wanted, create_graph=True)
        g = _flat(grads)
        loss = 1 - g @ target / g.norm().clamp_min(1e-12) + tv_weight * total_variation(x)
        x.grad, = torch.autograd.grad(loss, [x])
        if signed:
            x.grad.sign_()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach()


def mean_public_face(spec, count: int = 64, per_identity: int = 2) -> np.ndarray:
    """The average of ``count`` public identities' renders, ``per_identity`` each."""
    from fl.data.fleet import public_attributes, public_identity
    from fl.data.synthfaces import render

    count = max(1, min(count, spec.num_public))
    photos = [render(public_identity(spec, k),
                     [public_attributes(spec, k, i) for i in range(per_identity)],
                     spec.image_size) for k in range(count)]
    return np.concatenate(photos).mean(axis=0)


def best_match(candidates: torch.Tensor, truths: torch.Tensor) -> tuple[float, int, int]:
    """(PSNR, candidate, truth) of the best pair."""
    best = (-np.inf, 0, 0)
    for i, c in enumerate(candidates):
        for j, t in enumerate(truths):
            value = psnr(c[None], t[None])
            if value > best[0]:
                best = (value, i, j)
    return best


def attack(task, model: nn.Module, keys: Sequence[str], update: Mapping[str, torch.Tensor],
           truths: np.ndarray, mean_face: np.ndarray, steps: int, images: int = 4,
           seen: str = "device update", seed: int = 0, from_mean_face: bool = True
           ) -> Inversion:
    """Reconstruct, then score the best reconstruction and the mean face against
    the device's true photos ``truths`` ``(n, 3, S, S)``."""
    size = truths.shape[-1]
    recon = reconstruct(task, model, keys, update, images, size, steps, seed,
                        mean_face if from_mean_face else None)
    truth_t = torch.from_numpy(np.asarray(truths, np.float32))
    value, i, j = best_match(recon, truth_t)
    face = torch.from_numpy(np.asarray(mean_face, np.float32))[None]
    mean_value, _, _ = best_match(face, truth_t)
    return Inversion(float(value), ssim(recon[i:i + 1], truth_t[j:j + 1]), float(mean_value),
                     recon.numpy(), i, truths[j], seen)


def grid_image(rows: Sequence[tuple[str, np.ndarray, np.ndarray]],
               mean_face: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 grid: per row, the true photo, the mean public face and
    the reconstructions (``rows``: (label, truth, reconstructions))."""
    tiles = []
    width = max(len(r[2]) for r in rows) + 2
    for _, truth, recon in rows:
        row = [truth, mean_face, *recon]
        row += [np.ones_like(truth)] * (width - len(row))
        tiles.append(np.concatenate([np.pad(t, ((0, 0), (1, 1), (1, 1)), constant_values=1)
                                     for t in row], axis=2))
    grid = np.concatenate(tiles, axis=1)
    return (np.clip(grid.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
