"""The fleet's data spec, and the SynthFaces fleet: one device = one user = one identity.

A SynthFaces device regenerates its own photos from ``(seed, device index)``;
nothing about a device's photos ever has to be sent anywhere. Public identities
(for pretraining, server-side evaluation and "film clips") live in a disjoint id
range, so device identities can never enter pretraining or the server's
evaluation by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fl.data.controls import from_attributes
from fl.data.device_data import DeviceData, register_source
from fl.data.synthfaces import Attributes, Identity, render

# Public identities are numbered from here; device identities are 0..num_devices-1.
PUBLIC_ID_OFFSET = 1_000_000
# Film clips draw their identities from a third range, also disjoint.
CLIP_ID_OFFSET = 2_000_000
_COUNT_STREAM = 7


@dataclass(frozen=True)
class FleetSpec:
    """Where the fleet's photos come from (mirrors the ``data`` config).

    ``source`` picks a registered data source: ``synthfaces`` renders each device's
    photos; ``celeba`` and ``folders`` read them from ``root`` on disk (one device
    per identity with at least ``photos_min + heldout_photos`` photos). Public
    SynthFaces identities (pretraining, new-user checks, film clips) are used with
    every source.
    """

    source: str = "synthfaces"
    root: str = ""  # dataset directory (on-disk sources)
    controls_csv: str = ""  # per-photo portrait controls (folders source)
    crop: float = 1.0  # centred face crop, fraction of the shorter side (folders source)
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


def device_photo_count(spec: FleetSpec, device: int) -> int:
    rng = np.random.default_rng([spec.seed, _COUNT_STREAM, device])
    return int(rng.integers(spec.photos_min, spec.photos_max + 1))


def photo_id(index: int) -> str:
    return f"photo-{index:04d}"


def synthetic_device(spec: FleetSpec, identity_id: int, n: int) -> DeviceData:
    """``n`` training photos and ``spec.heldout_photos`` held-out photos of one
    SynthFaces identity, labelled with their exact controls."""
    identity = Identity.sample(spec.seed, identity_id)
    attrs = [Attributes.sample(spec.seed, identity_id, k) for k in range(n + spec.heldout_photos)]
    images = render(identity, attrs, spec.image_size)
    controls = from_attributes(attrs)
    ids = tuple(photo_id(k) for k in range(len(attrs)))
    return DeviceData(train=images[:n], train_ids=ids[:n], heldout=images[n:],
                      heldout_ids=ids[n:], train_controls=controls[:n],
                      heldout_controls=controls[n:], identity=identity)


def _synthfaces_device(spec: FleetSpec, device: int) -> DeviceData:
    return synthetic_device(spec, device, device_photo_count(spec, device))


register_source("synthfaces", lambda spec: spec.num_devices, _synthfaces_device)


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
