"""Portrait controls: what a user can ask of a portrait, and how photos are labelled.

A portrait is the user's face under requested **controls**: yaw, pitch, smile and
light direction (``light_x``, ``light_y``), all on SynthFaces' scales (yaw, pitch,
light in [-1, 1], smile in [0, 1]). The generator is also told the **backdrop**
colour, measured from a photo's border, because a device's photos are taken in
front of arbitrary backgrounds: without it the generator would have to guess the
scene and every portrait would be judged on the guess.

Labels come from SynthFaces' exact attributes, from CelebA's attributes and
landmarks (proxies, see ``fl.data.celeba``) or from a controls CSV. Light direction
can always be estimated from the image itself (``light_from_images``): the
brightness asymmetry of the face region, scaled to SynthFaces' range (a least
squares fit on renders gives light_x ~ 2.46 x asymmetry, correlation 0.87; the
vertical estimate is weak, correlation 0.27, and documented as such).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fl.data.synthfaces import Attributes

CONTROL_NAMES = ("yaw", "pitch", "smile", "light_x", "light_y")
NUM_CONTROLS = len(CONTROL_NAMES)
NUM_CONDITIONS = NUM_CONTROLS + 3  # controls + backdrop RGB
LIGHT_SCALE = 2.46
BORDER = 2  # pixels of the frame that measure the backdrop
# A neutral studio: the backdrop and light of every requested portrait.
STUDIO_BACKDROP = (0.55, 0.55, 0.58)


def from_attributes(attributes: Sequence[Attributes]) -> np.ndarray:
    """Exact controls of SynthFaces photos, ``(N, 5)`` float32."""
    return np.asarray([[getattr(a, name) for name in CONTROL_NAMES] for a in attributes],
                      np.float32).reshape(len(attributes), NUM_CONTROLS)


def backdrop(images: np.ndarray) -> np.ndarray:
    """Mean colour of each image's outer ``BORDER`` pixels, ``(N, 3)``."""
    b = BORDER
    ring = np.concatenate([images[:, :, :b, :].reshape(*images.shape[:2], -1),
                           images[:, :, -b:, :].reshape(*images.shape[:2], -1),
                           images[:, :, b:-b, :b].reshape(*images.shape[:2], -1),
                           images[:, :, b:-b, -b:].reshape(*images.shape[:2], -1)], axis=2)
    return ring.mean(axis=2).astype(np.float32)


def light_from_images(images: np.ndarray) -> np.ndarray:
    """Estimated (light_x, light_y) from the brightness asymmetry of the face region."""
    luminance = images.mean(axis=1)
    s = images.shape[-1]
    face = luminance[:, int(s * 0.2):int(s * 0.8), int(s * 0.2):int(s * 0.8)]
    half = face.shape[-1] // 2
    mean = face.mean(axis=(1, 2)) + 1e-6
    lx = (face[:, :, half:].mean(axis=(1, 2)) - face[:, :, :half].mean(axis=(1, 2))) / mean
    ly = (face[:, half:, :].mean(axis=(1, 2)) - face[:, :half, :].mean(axis=(1, 2))) / mean
    return np.clip(np.stack([lx, ly], axis=1) * LIGHT_SCALE, -1.0, 1.0).astype(np.float32)


def conditions(controls: np.ndarray, backdrops: np.ndarray) -> np.ndarray:
    """What the portrait generator is conditioned on: ``(N, NUM_CONDITIONS)``."""
    return np.concatenate([controls, backdrops], axis=1).astype(np.float32)


def check_controls(controls: np.ndarray, source: str) -> np.ndarray:
    """Clip labelled controls into their ranges; refuse non-numbers with the source named."""
    controls = np.asarray(controls, np.float32)
    if not np.isfinite(controls).all():
        raise ValueError(f"{source}: controls must be numbers, got {controls.tolist()}")
    low = np.array([-1, -1, 0, -1, -1], np.float32)
    high = np.array([1, 1, 1, 1, 1], np.float32)
    return np.clip(controls, low, high)
