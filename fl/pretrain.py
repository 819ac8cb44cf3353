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
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl.atomic import atomic_write
from fl.console import say
from fl.data.fleet import FleetSpec, public_identity
from fl.models.identity import PublicIdentities
from fl.tasks.base import Task

CHECKPOINT_FORMAT = 1
# Checkpoints committed to the repository (``pretrain.commit=true``), found by config hash.
COMMITTED_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "pretrain"


def checkpoint_key(task: Task, spec: FleetSpec, steps: int, batch_size: int,
                   lr: float, seed: int) -> str:
    """Hash of what determines the pretrained weights (not the fleet, not device settings)."""
    ident = {"format": CHECKPOINT_FORMAT, "task": task.architecture(), "data_seed": spec.seed,
             "identities": "mapper",
             "image_size": spec.image_size, "num_public": spec.num_public, "steps": steps,
             "batch_size": batch_size, "lr": lr, "seed": seed}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(task: Task, spec: FleetSpec, steps: int, batch_size: int, lr: float, seed: int,
             progress: Callable[[int, float], None] | None = None,
             device: torch.device | str = "cpu",
             stop_after: int | None = None) -> dict[str, Any]:
    """Train shared weights plus the map from public identities to their codes.

    Returns a checkpoint dict: the shared state, the mean public embedding as
    the public starting point of every device's personal part, and the table of
    public embeddings (``identities``, for checks; not saved in checkpoints).
    ``stop_after`` ends the schedule early (the reproduction check of a committed
    checkpoint replays its first steps).

    Schedule: Adam with a linear warm-up over the first 5% of the steps, then a
    cosine decay to zero, so the last steps settle instead of stopping mid-descent.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = task.build_model(spec.image_size)
    identities = PublicIdentities([public_identity(spec, k) for k in range(spec.num_public)],
                                  task.personal_dim)
    shared = [p for n, p in model.named_parameters() if not task.is_personal(n)]
    optimizer = torch.optim.Adam(shared + list(identities.parameters()), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
    from fl.device import place  # a device process never pretrains

    place(device, model, identities)  # the `device` key (fl.device)
    model.train()
    for step in range(1, min(steps, stop_after or steps) + 1):
        loss = task.pretrain_loss(model, identities, spec, rng, batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress:
            progress(step, loss.item())
    model.cpu(), identities.cpu()  # the checkpoint holds CPU tensors
    with torch.no_grad():
        codes = identities.weight
    return {"shared": task.shared_state(model),
            "personal_init": task.personal_init(model, codes.mean(dim=0, keepdim=True)),
            "identities": codes}


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    warmup = max(steps // 20, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return factor


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


def committed_path(task: Task, key: str, committed_dir: str | Path = COMMITTED_DIR) -> Path:
    """Where a committed checkpoint of this config hash lives (it may not exist)."""
    return Path(committed_dir) / f"{task.name}-{key}.pt"


def record_path(checkpoint: Path) -> Path:
    """The JSON record beside a checkpoint: config hash, loss curve, wall time."""
    return checkpoint.with_suffix(".record.json")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def committed_checkpoint(task: Task, key: str,
                         committed_dir: str | Path = COMMITTED_DIR) -> Path | None:
    """The committed checkpoint for this config hash, if one is there and intact.

    Used only when its file name *and* its record carry exactly this hash and the
    file's SHA-256 is the recorded one: a changed config pretrains afresh."""
    path = committed_path(task, key, committed_dir)
    record = record_path(path)
    if not (path.is_file() and record.is_file()):
        return None
    meta = json.loads(record.read_text())
    if meta.get("key") != key or meta.get("sha256") != file_sha256(path):
        return None
    return path


def write_record(path: Path, key: str, task: Task, spec: FleetSpec, steps: int,
                 batch_size: int, lr: float, seed: int, losses: list[float],
                 seconds: float) -> Path:
    """Record a fresh pretraining beside its checkpoint (what a commit publishes)."""
    tail = losses[-max(len(losses) // 20, 1):] if losses else [float("nan")]
    meta = {"key": key, "task": task.name, "architecture": task.architecture(),
            "image_size": spec.image_size, "num_public": spec.num_public,
            "data_seed": spec.seed, "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "seconds": round(seconds, 1),
            "final_loss": float(np.mean(tail)), "sha256": file_sha256(path),
            "losses": [round(v, 6) for v in losses]}
    target = record_path(path)
    atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return target


def cached_pretrain(task: Task, spec: FleetSpec, steps: int,
                    batch_size: int, lr: float, seed: int, cache_dir: str | Path,
                    log: Callable[[str], None] = say,
                    device: torch.device | str = "cpu",
                    on_trained: Callable[[Path, list[float], float], None] | None = None,
                    committed_dir: str | Path = COMMITTED_DIR) -> Path:
    """Path of the pretrained checkpoint for this config, training it if missing.

    Looks in the cache, then among the committed checkpoints (same config hash
    only), and trains otherwise. ``on_trained(path, losses, seconds)`` is called
    after a fresh training (the MLflow record of the pretraining hangs off it)."""
    key = checkpoint_key(task, spec, steps, batch_size, lr, seed)
    path = Path(cache_dir) / f"{task.name}-{key}.pt"
    if path.is_file():
        log(f"pretrained shared weights: cached at {path}")
        return path
    committed = committed_checkpoint(task, key, committed_dir)
    if committed is not None:
        log(f"pretrained shared weights: committed checkpoint {committed} "
            f"(config hash {key} matches)")
        return committed
    log(f"pretraining {task.name} on {spec.num_public} public identities "
        f"({steps} steps, {spec.image_size}px, config hash {key}); cached at {path}")
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
    seconds = time.time() - start
    write_record(path, key, task, spec, steps, batch_size, lr, seed, losses, seconds)
    if on_trained:
        on_trained(path, losses, seconds)
    return path
