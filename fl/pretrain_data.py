"""Pretraining on photos the researcher has on disk: ``pretrain.data=celeba|folders``.

SynthFaces pretraining (``fl.pretrain``) knows every render's ground truth,
including a face swap's. A public dataset of real faces (CelebA, FFHQ or LFW in
the per-identity folders layout) has none: nobody photographed A under B's pose.
So the objective is **self-supervised reconstruction with a per-identity
embedding**, as DeepFaceLab-style models learn:

* every identity of the dataset gets a row of an embedding table, learnt with
  the shared weights; its mean becomes every device's public starting point,
  exactly as the mean public identity does in SynthFaces pretraining;
* **swap**: the model redraws a photo from *its own* frame, scrambled in colour
  and slightly warped (``fl.data.augment``), with its identity's embedding. The
  scramble is the bottleneck: colour must come from the embedding, and the face
  must be redrawn rather than copied through the skips;
* **portrait**: the model redraws a photo from its conditions with its
  identity's embedding. Controls come from the source where it has them (CelebA:
  landmark and attribute proxies; folders: ``pretrain.controls_csv``); otherwise
  yaw, pitch and smile are fitted per photo alongside everything else
  (``fl.latent_controls``), light is estimated and the backdrop measured. Fitted
  controls are whatever best explains each photo: the generator then learns *a*
  pose and expression code, not one calibrated to SynthFaces' scales, and
  requested controls mean less than after labelled pretraining (docs/data.md).

Photos are read by the same sources as federated data (``fl.data.device_data``:
robust decoding, unusable files counted), one identity per folder or CelebA
identity, every photo used (none held out), and held in memory as 8-bit.
Checkpoints are cached under a key that adds the data source, its settings and a
fingerprint of its files (names, sizes, modification times) to the SynthFaces key,
so a changed dataset pretrains afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl.console import say
from fl.data.device_data import available_devices, forget, load_device_data
from fl.data.fleet import FleetSpec
from fl.latent_controls import PhotoConditions, known_conditions
from fl.pretrain import checkpoint_key, save_checkpoint
from fl.tasks.base import Task

SOURCES = ("synthfaces", "celeba", "folders")
CHUNK = 4096  # photos converted to float at a time (conditions, never all at once)


@dataclass(frozen=True)
class PhotoSource:
    """Where real pretraining photos are (the ``pretrain.data/root/crop/controls_csv`` keys)."""

    data: str
    root: str
    crop: float = 1.0
    controls_csv: str = ""

    def spec(self, image_size: int, seed: int) -> FleetSpec:
        """A data spec that makes every identity with a usable photo a 'device'."""
        return FleetSpec(source=self.data, root=self.root, controls_csv=self.controls_csv,
                         crop=self.crop, seed=seed, num_devices=1, photos_min=1,
                         photos_max=10**9, heldout_photos=0, image_size=image_size)

    def fingerprint(self) -> str:
        """Digest of the source's files: relative names, sizes, modification times."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        root = Path(self.root)
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(files):
                stat = (Path(folder) / name).stat()
                rel = os.path.relpath(Path(folder) / name, root)
                h.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        if self.controls_csv and Path(self.controls_csv).is_file():
            h.update(Path(self.controls_csv).read_bytes())
        return h.hexdigest()


def photo_source(pretrain_cfg) -> PhotoSource | None:
    """The on-disk source the ``pretrain`` config names, or None for SynthFaces.
    ValueError, naming the key, when it is not usable."""
    data = str(pretrain_cfg.get("data") or "synthfaces")
    if data not in SOURCES:
        raise ValueError(f"pretrain.data={data!r} is invalid: choose one of "
                         f"{', '.join(SOURCES)}")
    if data == "synthfaces":
        return None
    root = pretrain_cfg.get("root")
    if not root or not Path(str(root)).is_dir():
        raise ValueError(f"pretrain.root={root!r} is invalid: pretrain.data={data} reads "
                         "a dataset directory; point pretrain.root at it (docs/data.md)")
    csv = str(pretrain_cfg.get("controls_csv") or "")
    if csv and not Path(csv).is_file():
        raise ValueError(f"pretrain.controls_csv={csv!r} does not exist")
    return PhotoSource(data, str(Path(str(root)).resolve()),
                       float(pretrain_cfg.get("crop") or 1.0), csv)


@dataclass
class PhotoSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    identity: torch.Tensor  # (N,) long: the photo's identity, 0..identities-1
    conditions: np.ndarray  # (N, NUM_CONDITIONS): known portrait conditions
    labelled: bool  # whether the controls came from the source (else fitted per photo)
    identities: int
    skipped: int  # unusable files
    excluded: int  # identities with no usable photo


def load_photo_set(source: PhotoSource, image_size: int, seed: int,
                   log: Callable[[str], None] = say) -> PhotoSet:
    spec = source.spec(image_size, seed)
    count = available_devices(spec)
    spec = replace(spec, num_devices=max(count, 1))
    images, ids, controls, skipped, excluded = [], [], [], 0, 0
    for device in range(count):
        data = load_device_data(spec, device)
        forget(spec, device)  # held once, as 8-bit, below
        skipped += len(data.skipped)
        if data.excluded or not len(data.train):
            excluded += 1
            continue
        images.append(np.round(data.train * 255).astype(np.uint8))
        ids.append(np.full(len(data.train), len(ids), np.int64))
        controls.append(data.train_controls)
    if not images:
        raise ValueError(f"pretrain.root={source.root!r} holds no usable photo for "
                         f"pretrain.data={source.data} ({skipped} files skipped)")
    labelled = all(c is not None for c in controls)
    stack = np.concatenate(images)
    labels = np.concatenate(controls) if labelled else None
    conds = np.concatenate([known_conditions(
        stack[i:i + CHUNK].astype(np.float32) / 255, None if labels is None else
        labels[i:i + CHUNK]) for i in range(0, len(stack), CHUNK)])
    log(f"pretraining photos: {len(stack)} of {len(ids)} identities from {source.root} "
        f"({source.data}; {skipped} files skipped, {excluded} identities without a usable "
        f"photo; controls {'from the source' if labelled else 'fitted per photo'})")
    return PhotoSet(torch.from_numpy(stack), torch.from_numpy(np.concatenate(ids)), conds,
                    labelled, len(ids), skipped, excluded)


def pretrain_on_photos(task: Task, photos: PhotoSet, steps: int, batch_size: int, lr: float,
                       seed: int, progress: Callable[[int, float], None] | None = None
                       ) -> dict[str, Any]:
    """Train the shared weights, an embedding per identity and (portrait, without
    labels) each photo's yaw, pitch and smile; the same checkpoint dict as
    ``fl.pretrain.pretrain``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = task.build_model(photos.images.shape[-1])
    identities = nn.Embedding(photos.identities, task.personal_dim)
    nn.init.normal_(identities.weight, 0.0, 0.1)
    conds = PhotoConditions(photos.conditions, fit=not photos.labelled) \
        if task.needs_controls else None
    params = [p for n, p in model.named_parameters() if not task.is_personal(n)]
    params += list(identities.parameters())
    if conds is not None and conds.fitted.requires_grad:
        params.append(conds.fitted)
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    model.train()
    for step in range(1, steps + 1):
        index = torch.randint(len(photos.images), (batch_size,), generator=generator)
        batch = photos.images[index].float() / 255
        loss = task.pretrain_loss_on_photos(model, batch, identities(photos.identity[index]),
                                            None if conds is None else conds(index), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress:
            progress(step, loss.item())
    codes = identities.weight.detach()
    return {"shared": task.shared_state(model),
            "personal_init": task.personal_init(model, codes.mean(dim=0, keepdim=True)),
            "identities": codes}


def photo_checkpoint_key(task: Task, spec: FleetSpec, source: PhotoSource, steps: int,
                         batch_size: int, lr: float, seed: int) -> str:
    """The SynthFaces key (architecture, image size, schedule, seed) plus the source."""
    base = checkpoint_key(task, spec, steps, batch_size, lr, seed)
    return hashlib.sha256(f"{base}|{source.fingerprint()}".encode()).hexdigest()[:16]


def cached_pretrain_on_photos(task: Task, spec: FleetSpec, source: PhotoSource, steps: int,
                              batch_size: int, lr: float, seed: int, cache_dir: str | Path,
                              log: Callable[[str], None] = say,
                              on_trained: Callable[[Path, list[float], float], None]
                              | None = None) -> Path:
    """Path of the checkpoint pretrained on ``source``, training it if missing."""
    key = photo_checkpoint_key(task, spec, source, steps, batch_size, lr, seed)
    path = Path(cache_dir) / f"{task.name}-{source.data}-{key}.pt"
    if path.is_file():
        log(f"pretrained shared weights ({source.data} at {source.root}): cached at {path}")
        return path
    photos = load_photo_set(source, spec.image_size, spec.seed, log)
    log(f"pretraining {task.name} on {source.data} ({steps} steps, {spec.image_size}px, "
        f"self-supervised); cached at {path}")
    start, every, losses = time.time(), max(steps // 10, 1), []

    def progress(step: int, loss: float) -> None:
        losses.append(loss)
        if step % every == 0 or step == steps:
            log(f"  pretrain step {step}/{steps}  loss {loss:.4f}  "
                f"{time.time() - start:.0f}s elapsed")

    checkpoint = pretrain_on_photos(task, photos, steps, batch_size, lr, seed, progress)
    save_checkpoint(path, checkpoint["shared"], checkpoint["personal_init"])
    if on_trained:
        on_trained(path, losses, time.time() - start)
    return path
