"""Central pretraining of the shared weights on *public* identities only.

Why: DP-SGD from random weights learns nothing useful in a few dozen rounds of a
few noisy steps per device (measured while planning fedface); a generator that
already draws faces needs only a small personal part and gentle fine-tuning.
Device identities live in a disjoint id range (``fl.data.fleet``), so they cannot
enter pretraining.

Checkpoints are cached by a hash of everything that determines them, so
``make run`` pretrains once per configuration.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl.atomic import atomic_write
from fl.console import say
from fl.data.fleet import FleetSpec
from fl.tasks.base import Task

CHECKPOINT_FORMAT = 1


def checkpoint_key(task: Task, spec: FleetSpec, steps: int, batch_size: int,
                   lr: float, seed: int) -> str:
    """Hash of what determines the pretrained weights (not the fleet, not device settings)."""
    ident = {"format": CHECKPOINT_FORMAT, "task": task.architecture(), "data_seed": spec.seed,
             "image_size": spec.image_size, "num_public": spec.num_public, "steps": steps,
             "batch_size": batch_size, "lr": lr, "seed": seed}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(task: Task, spec: FleetSpec, steps: int, batch_size: int, lr: float, seed: int,
             progress: Callable[[int, float], None] | None = None,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Train shared weights plus a table of public identity embeddings.

    Returns a checkpoint dict: the shared state, and the mean public embedding as
    the public starting point of every device's personal part.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = task.build_model(spec.image_size)
    identities = nn.Embedding(spec.num_public, task.personal_dim)
    nn.init.normal_(identities.weight, 0.0, 0.1)
    shared = [p for n, p in model.named_parameters() if not task.is_personal(n)]
    optimizer = torch.optim.Adam(shared + list(identities.parameters()), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    from fl.device import place  # a device process never pretrains

    place(device, model, identities)  # the `device` key (fl.device)
    model.train()
    for step in range(1, steps + 1):
        loss = task.pretrain_loss(model, identities, spec, rng, batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress:
            progress(step, loss.item())
    model.cpu(), identities.cpu()  # the checkpoint holds CPU tensors
    mean_identity = identities.weight.detach().mean(dim=0, keepdim=True)
    return {"shared": task.shared_state(model),
            "personal_init": task.personal_init(model, mean_identity)}


def save_checkpoint(path: str | Path, shared: dict[str, torch.Tensor],
                    personal_init: dict[str, torch.Tensor]) -> Path:
    """Write a checkpoint atomically: an interrupted run never leaves half a file."""
    checkpoint = {"format": CHECKPOINT_FORMAT, "shared": shared, "personal_init": personal_init}
    return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.init={str(path)!r} does not exist; give a checkpoint written by "
            "`python -m experiments.pretrain`, or model.init=null to pretrain")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fedface checkpoint of format {CHECKPOINT_FORMAT}")
    return checkpoint


def cached_pretrain(task: Task, spec: FleetSpec, steps: int,
                    batch_size: int, lr: float, seed: int, cache_dir: str | Path,
                    log: Callable[[str], None] = say,
                    device: torch.device | str = "cpu",
                    on_trained: Callable[[Path, list[float], float], None] | None = None) -> Path:
    """Path of the pretrained checkpoint for this config, training it if missing.

    ``on_trained(path, losses, seconds)`` is called after a fresh training (the
    MLflow record of the pretraining hangs off it)."""
    key = checkpoint_key(task, spec, steps, batch_size, lr, seed)
    path = Path(cache_dir) / f"{task.name}-{key}.pt"
    if path.is_file():
        log(f"pretrained shared weights: cached at {path}")
        return path
    log(f"pretraining {task.name} on {spec.num_public} public identities "
        f"({steps} steps, {spec.image_size}px); cached at {path}")
    start = time.time()
    every = max(steps // 10, 1)
    losses: list[float] = []

    def progress(step: int, loss: float) -> None:
        losses.append(loss)
        if step % every == 0 or step == steps:
            elapsed = time.time() - start
            eta = elapsed / step * (steps - step)
            log(f"  pretrain step {step}/{steps}  loss {loss:.4f}  "
                f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left")

    checkpoint = pretrain(task, spec, steps, batch_size, lr, seed, progress, device=device)
    save_checkpoint(path, checkpoint["shared"], checkpoint["personal_init"])
    if on_trained:
        on_trained(path, losses, time.time() - start)
    return path
