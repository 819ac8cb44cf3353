"""An attribute network for SynthFaces: the evaluation's ArcFace and pose estimator.

Why: PSNR against the exact ground truth rewards a blur that gets the colours
right. A face-swap evaluation protocol instead asks a *recogniser* whether the
output shows the right person (ArcFace identity retrieval) and a pose estimator
whether it shows the right pose. SynthFaces knows every identity's and photo's
parameters, so a small CNN learns both from renders:

* identity attributes: face shape (width, height, jaw), skin tone, hair style,
  colour and fringe, eye colour, glasses;
* photo attributes: yaw, pitch, smile, light direction and intensity.

The identity feature vector (``identity_features``) is the standardised predicted
identity attributes (categorical ones as probabilities): interpretable, and the
same on every machine.

It learns from **public** identities only, in their own id range
(``TRAIN_ID_OFFSET``), rendered from a fixed seed. A SynthFaces identity is keyed
by ``(seed, id)`` and device ids lie below ``PUBLIC_ID_OFFSET``, so whatever a
run's data seed, no device's identity is ever a training render. It is trained
without blur augmentation, on purpose: like ArcFace, it recognises sharp faces.

Deterministic from its config and cached by a hash of what determines it
(``.fedface-cache/attributes``, or ``$FEDFACE_CACHE/attributes``): the server
trains it before a run starts (``ensure_attribute_net``), devices and the server
load it from there, and a process that finds no cache trains the same weights
itself. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl.atomic import atomic_write
from fl.data.fleet import PUBLIC_ID_OFFSET
from fl.data.synthfaces import _HAIR, _IRIS, _SKIN_DARK, _SKIN_LIGHT, Attributes, Identity, render

FORMAT = 1
# Public identity ranges (inside [PUBLIC_ID_OFFSET, CLIP_ID_OFFSET)), disjoint from
# pretraining ([0, num_public)) and the new-user check (num_public + k).
TRAIN_ID_OFFSET = PUBLIC_ID_OFFSET + 400_000  # the attribute net learns from these
TEST_ID_OFFSET = PUBLIC_ID_OFFSET + 450_000  # held out: its accuracy is measured here
GALLERY_ID_OFFSET = PUBLIC_ID_OFFSET + 300_000  # distractors of the identity retrieval
RENDER_SEED = 0  # the attribute net's renders do not depend on a run's data seed

# Continuous identity attributes and their ranges in Identity.sample (uniform). The
# finer geometry (eye spacing and size, brows, nose, mouth width) is left out: at
# 32 px it spans a pixel or less, and a net this small learnt none of it (R^2 ~ 0).
ID_RANGES = {
    "face_width": (0.46, 0.60), "face_height": (0.60, 0.74), "jaw": (0.0, 0.35),
    "skin_tone": (0.0, 1.0), "fringe": (0.35, 0.75),
}
ID_CONTINUOUS = tuple(ID_RANGES)
# Categorical identity attributes: name -> number of classes.
ID_CLASSES = {"hair_style": 4, "hair_colour": len(_HAIR), "eye_colour": len(_IRIS)}
# Per-photo attributes and their ranges in Attributes.sample.
PHOTO_RANGES = {"yaw": (-1.0, 1.0), "pitch": (-1.0, 1.0), "smile": (0.0, 1.0),
                "light_x": (-1.0, 1.0), "light_y": (-0.8, 0.4),
                "light_intensity": (0.65, 1.25)}
PHOTO_NAMES = tuple(PHOTO_RANGES)
POSE_NAMES = ("yaw", "pitch", "smile")  # pose and expression: what a swap must keep
CONTROL_NAMES = ("yaw", "pitch", "smile", "light_x", "light_y")  # fl.data.controls


@dataclass(frozen=True)
class AttributeNetConfig:
    """What determines the attribute network's weights (with the image size)."""

    identities: int = 2500
    photos_per_identity: int = 2
    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 8
    seed: int = 0


def _standardise(value: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map a uniform [low, high] variable to zero mean, unit variance."""
    return (np.asarray(value, np.float32) - (low + high) / 2) / ((high - low) / np.sqrt(12))


def _unstandardise(value: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return value * ((high - low) / np.sqrt(12)) + (low + high) / 2


def _nearest(colour: tuple[float, ...], palette: np.ndarray) -> int:
    return int(np.argmin(((palette - np.asarray(colour, np.float32)) ** 2).sum(axis=1)))


def skin_tone(identity: Identity) -> float:
    """The light-to-dark position of an identity's skin colour (0 light .. 1 dark)."""
    axis = _SKIN_DARK - _SKIN_LIGHT
    return float(np.dot(np.asarray(identity.skin) - _SKIN_LIGHT, axis) / np.dot(axis, axis))


def identity_targets(identity: Identity) -> tuple[np.ndarray, np.ndarray]:
    """(standardised continuous attributes, class indices incl. glasses) of an identity."""
    values = {f.name: getattr(identity, f.name) for f in fields(Identity)}
    values["skin_tone"] = skin_tone(identity)
    cont = np.array([_standardise(values[n], *ID_RANGES[n]) for n in ID_CONTINUOUS],
                    np.float32)
    classes = np.array([identity.hair_style, _nearest(identity.hair, _HAIR),
                        _nearest(identity.iris, _IRIS), int(identity.glasses)], np.int64)
    return cont, classes


def photo_targets(attrs: list[Attributes] | tuple[Attributes, ...]) -> np.ndarray:
    """Standardised per-photo attributes, ``(N, len(PHOTO_NAMES))``."""
    return np.array([[_standardise(getattr(a, n), *PHOTO_RANGES[n]) for n in PHOTO_NAMES]
                     for a in attrs], np.float32).reshape(len(attrs), len(PHOTO_NAMES))


class AttributeNet(nn.Module):
    """A small CNN: a shared trunk, an identity head and a photo head.

    Images of 64 px and more enter through a strided first layer, so the trunk
    always works at about 32 px and the cost stays close to the 32 px one.
    """

    def __init__(self, image_size: int, width: int = 12) -> None:
        super().__init__()
        w = width
        fold = max(1, image_size // 16)
        self.image_size = image_size
        self.trunk = nn.Sequential(
            nn.PixelUnshuffle(fold),  # lossless: every pixel reaches the first layer
            nn.Conv2d(3 * fold * fold, 2 * w, 3, 1, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 8 * w, 3, 2, 1), nn.BatchNorm2d(8 * w), nn.ReLU(),
            nn.Flatten(),
        )
        n_classes = sum(ID_CLASSES.values()) + 1  # + glasses (one logit)
        self.identity_head = nn.Sequential(nn.Linear(8 * w * 16, 128), nn.ReLU(),
                                           nn.Linear(128, len(ID_CONTINUOUS) + n_classes))
        self.photo_head = nn.Sequential(nn.Linear(8 * w * 16, 64), nn.ReLU(),
                                        nn.Linear(64, len(PHOTO_NAMES)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(identity outputs, standardised photo attributes) of images in [0, 1]."""
        if images.shape[-1] != self.image_size:
            raise ValueError(f"the attribute net was trained on {self.image_size} px images, "
                             f"got {images.shape[-1]} px")
        h = self.trunk(images * 2.0 - 1.0)
        return self.identity_head(h), self.photo_head(h)


def _split_identity(out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Identity head output -> (continuous, [logits per class attribute], glasses logit)."""
    n = len(ID_CONTINUOUS)
    cont, rest = out[:, :n], out[:, n:]
    logits, start = [], 0
    for k in ID_CLASSES.values():
        logits.append(rest[:, start:start + k])
        start += k
    return cont, logits, rest[:, start]


def render_dataset(image_size: int, identities: int, photos: int, offset: int,
                   seed: int = RENDER_SEED) -> dict[str, np.ndarray]:
    """Images and targets of ``identities`` public identities, ``photos`` each."""
    ids = [Identity.sample(seed, offset + i) for i in range(identities)]
    per_image = [ident for ident in ids for _ in range(photos)]
    attrs = [Attributes.sample(seed, offset + i, k) for i in range(identities)
             for k in range(photos)]
    targets = [identity_targets(ident) for ident in ids]
    cont = np.stack([t[0] for t in targets]).repeat(photos, axis=0)
    classes = np.stack([t[1] for t in targets]).repeat(photos, axis=0)
    images = np.concatenate([render(per_image[i:i + 512], attrs[i:i + 512], image_size)
                             for i in range(0, len(attrs), 512)])
    return {"images": images, "id_cont": cont, "id_classes": classes,
            "photo": photo_targets(attrs)}


# The smile is the subtlest photo attribute at 32 px (a pixel of mouth curvature, the
# teeth above 0.5): weighted up so that the trunk learns to look at the mouth.
_PHOTO_WEIGHTS = torch.tensor([4.0 if n == "smile" else 1.0 for n in PHOTO_NAMES]) / len(
    PHOTO_NAMES)


def _loss(net: AttributeNet, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    id_out, photo_out = net(batch["images"])
    cont, logits, glasses = _split_identity(id_out)
    photo_error = ((photo_out - batch["photo"]) ** 2).mean(dim=0)
    loss = F.mse_loss(cont, batch["id_cont"]) + (photo_error * _PHOTO_WEIGHTS).sum()
    for k, lg in enumerate(logits):
        loss = loss + F.cross_entropy(lg, batch["id_classes"][:, k])
    return loss + F.binary_cross_entropy_with_logits(glasses,
                                                     batch["id_classes"][:, -1].float())


def train_attribute_net(image_size: int, config: AttributeNetConfig = AttributeNetConfig(),
                        log=None) -> AttributeNet:
    """Train the attribute network on public renders (deterministic from ``config.seed``).

    Gradients on even when called from evaluation code under ``torch.no_grad`` (a
    device whose cache is empty trains the net inside ``evaluate_device``)."""
    with torch.enable_grad():
        return _train(image_size, config, log)


def _train(image_size: int, config: AttributeNetConfig, log) -> AttributeNet:
    torch.manual_seed(config.seed)
    data = {k: torch.from_numpy(v) for k, v in render_dataset(
        image_size, config.identities, config.photos_per_identity, TRAIN_ID_OFFSET).items()}
    net = AttributeNet(image_size, config.width)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    n = len(data["images"])
    steps = config.epochs * max(n // config.batch_size, 1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    net.train()
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - config.batch_size + 1, config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = _loss(net, {k: v[idx] for k, v in data.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        if log:
            log(f"  attribute net epoch {epoch + 1}/{config.epochs}  loss {loss.item():.3f}")
    return net.eval()


def cache_key(image_size: int, config: AttributeNetConfig) -> str:
    ident = {"format": FORMAT, "image_size": int(image_size), "config": asdict(config),
             "render_seed": RENDER_SEED, "train_offset": TRAIN_ID_OFFSET}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where attribute nets are cached: ``$FEDFACE_CACHE/attributes`` (default
    ``.fedface-cache/attributes`` in the working directory)."""
    return Path(os.environ.get("FEDFACE_CACHE", ".fedface-cache")) / "attributes"


_LOADED: dict[tuple[str, int, AttributeNetConfig], AttributeNet] = {}


def attribute_net(image_size: int, config: AttributeNetConfig = AttributeNetConfig(),
                  directory: str | Path | None = None, log=None) -> AttributeNet:
    """The attribute network for ``image_size``: from this process, the cache, or trained
    (and cached) now."""
    directory = Path(directory) if directory is not None else cache_dir()
    memo = (str(directory.resolve()), int(image_size), config)
    if memo in _LOADED:
        return _LOADED[memo]
    path = directory / f"attributes-{image_size}px-{cache_key(image_size, config)}.pt"
    net = AttributeNet(image_size, config.width)
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        start = time.time()
        if log:
            log(f"training the attribute net ({image_size}px, {config.identities} public "
                f"identities); cached at {path}")
        net = train_attribute_net(image_size, config, log)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(net.state_dict(), tmp))
        if log:
            log(f"attribute net trained in {time.time() - start:.0f}s")
    net.eval().requires_grad_(False)
    _LOADED[memo] = net
    return net


# ---------------------------------------------------------------- what it predicts


@dataclass
class Predictions:
    """Decoded predictions: continuous attributes on their own scales, class indices."""

    identity: dict[str, np.ndarray]
    photo: dict[str, np.ndarray]


@torch.no_grad()
def predict(net: AttributeNet, images: torch.Tensor) -> Predictions:
    id_out, photo_out = net(images.clamp(0, 1))
    cont, logits, glasses = _split_identity(id_out)
    identity = {n: _unstandardise(cont[:, i], *ID_RANGES[n]).numpy()
                for i, n in enumerate(ID_CONTINUOUS)}
    identity |= {n: lg.argmax(dim=1).numpy() for n, lg in zip(ID_CLASSES, logits)}
    identity["glasses"] = (glasses > 0).numpy()
    photo = {n: _unstandardise(photo_out[:, i], *PHOTO_RANGES[n]).numpy()
             for i, n in enumerate(PHOTO_NAMES)}
    return Predictions(identity, photo)


@torch.no_grad()
def identity_features(net: AttributeNet, images: torch.Tensor) -> torch.Tensor:
    """Identity feature vectors ``(N, D)``: standardised predicted continuous identity
    attributes, then class probabilities (hair style, hair colour, eye colour,
    glasses), each class block scaled to weigh like about two continuous attributes."""
    id_out, _ = net(images.clamp(0, 1))
    cont, logits, glasses = _split_identity(id_out)
    probs = [F.softmax(lg, dim=1) * 2.0 for lg in logits]
    g = torch.sigmoid(glasses)[:, None] * 2.0
    return torch.cat([cont, *probs, g], dim=1)


@torch.no_grad()
def photo_attributes(net: AttributeNet, images: torch.Tensor,
                     names: tuple[str, ...]) -> np.ndarray:
    """Predicted photo attributes ``names`` on their own scales, ``(N, len(names))``."""
    photo = predict(net, images).photo
    return np.stack([photo[n] for n in names], axis=1)
