"""The simulated fleet: one device = one user = one SynthFaces identity.

A device regenerates its own photos from ``(seed, device index)``; nothing about a
device's photos ever has to be sent anywhere. Public identities (for pretraining,
server-side evaluation and "film clips") live in a disjoint id range, so device
identities can never enter pretraining or the server's evaluation by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fl.data.synthfaces import Attributes, Identity, render

# Public identities are numbered from here; device identities are 0..num_devices-1.
PUBLIC_ID_OFFSET = 1_000_000
# Film clips draw their identities from a third range, also disjoint.
CLIP_ID_OFFSET = 2_000_000
_COUNT_STREAM = 7


@dataclass(frozen=True)
class FleetSpec:
    """How the simulated fleet's data is generated (mirrors the ``data`` config)."""

    seed: int = 0
    num_devices: int = 100
    photos_min: int = 20
    photos_max: int = 40
    heldout_photos: int = 8
    image_size: int = 64
    num_public: int = 200
    clip_length: int = 8

    def __post_init__(self) -> None:
        if self.photos_min < 1 or self.photos_max < self.photos_min:
            raise ValueError(
                "data.photos_min must be >= 1 and data.photos_max >= data.photos_min, "
                f"got {self.photos_min}..{self.photos_max}"
            )


@dataclass(frozen=True)
class DevicePhotos:
    """One device's local data: training photos and held-out photos."""

    identity: Identity
    train: np.ndarray  # (n, 3, S, S) float32
    heldout: np.ndarray  # (h, 3, S, S)
    heldout_attributes: tuple[Attributes, ...]


def device_photo_count(spec: FleetSpec, device: int) -> int:
    rng = np.random.default_rng([spec.seed, _COUNT_STREAM, device])
    return int(rng.integers(spec.photos_min, spec.photos_max + 1))


@lru_cache(maxsize=256)
def device_photos(spec: FleetSpec, device: int) -> DevicePhotos:
    """The photos on device ``device`` (cached per process: a simulation worker
    serves many rounds of the same devices, and rendering is pure)."""
    if not 0 <= device < spec.num_devices:
        raise ValueError(f"device {device} is outside the fleet of {spec.num_devices}")
    identity = Identity.sample(spec.seed, device)
    n = device_photo_count(spec, device)
    attrs = [Attributes.sample(spec.seed, device, k) for k in range(n + spec.heldout_photos)]
    images = render(identity, attrs, spec.image_size)
    return DevicePhotos(identity, images[:n], images[n:], tuple(attrs[n:]))


def public_identity(spec: FleetSpec, k: int) -> Identity:
    return Identity.sample(spec.seed, PUBLIC_ID_OFFSET + k)


def public_attributes(spec: FleetSpec, k: int, index: int) -> Attributes:
    return Attributes.sample(spec.seed, PUBLIC_ID_OFFSET + k, index)


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def film_clip(spec: FleetSpec, clip: int) -> tuple[Identity, list[Attributes]]:
    """A short "film clip": one public actor whose pose, expression and light
    change smoothly between two key frames, in one scene."""
    actor_id = CLIP_ID_OFFSET + clip
    actor = Identity.sample(spec.seed, actor_id)
    start = Attributes.sample(spec.seed, actor_id, 0)
    end = Attributes.sample(spec.seed, actor_id, 1)
    frames = []
    for i in range(spec.clip_length):
        t = i / max(spec.clip_length - 1, 1)
        frames.append(
            start.replace(
                yaw=_lerp(start.yaw, end.yaw, t),
                pitch=_lerp(start.pitch, end.pitch, t),
                smile=_lerp(start.smile, end.smile, t),
                light_x=_lerp(start.light_x, end.light_x, t),
                light_y=_lerp(start.light_y, end.light_y, t),
                light_intensity=_lerp(start.light_intensity, end.light_intensity, t),
                noise_seed=start.noise_seed + i,
            )
        )
    return actor, frames


@lru_cache(maxsize=64)
def swap_benchmark(spec: FleetSpec, num_clips: int) -> tuple[np.ndarray, tuple[Attributes, ...]]:
    """Clip frames used to evaluate swaps: images ``(F, 3, S, S)`` and their attributes.

    The ground truth of a swap onto a user is ``render(user, attributes)``: the
    user's face with the frame's pose, expression, light and scene.
    """
    frames, attrs = [], []
    for c in range(num_clips):
        actor, clip_attrs = film_clip(spec, c)
        frames.append(render(actor, clip_attrs, spec.image_size))
        attrs.extend(clip_attrs)
    return np.concatenate(frames), tuple(attrs)
