"""SynthFaces: a parametric face renderer (numpy only, no downloads).

Why a renderer and not a dataset: fedface needs *exact* ground truth to evaluate a
face swap (the user's face under the clip frame's pose, expression, light and
scene) and a portrait (the user's face under requested controls). A renderer can
draw any identity under any attributes, so every evaluation target exists exactly.

Everything is deterministic from ``(seed, identity, photo index)``: the same call
gives the same pixels on every machine and in every process, which is what lets a
simulated device regenerate "its" photos from its partition id instead of
receiving them from anywhere.

Rendering is vectorised over a batch (all arrays are ``(N, S, S)``), which keeps
it well above 1,000 images/s at 64x64 on one core (see ``experiments/bench``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

MIN_SIZE, MAX_SIZE = 32, 128

# Palettes in linear-ish RGB [0, 1]. Skin tones span a light-to-dark axis.
_SKIN_LIGHT = np.array([0.96, 0.80, 0.69], np.float32)
_SKIN_DARK = np.array([0.36, 0.22, 0.15], np.float32)
_HAIR = np.array(
    [[0.08, 0.06, 0.05], [0.35, 0.22, 0.12], [0.85, 0.70, 0.40], [0.62, 0.25, 0.10],
     [0.70, 0.70, 0.72]], np.float32)
_IRIS = np.array(
    [[0.35, 0.20, 0.10], [0.25, 0.45, 0.75], [0.30, 0.55, 0.30], [0.45, 0.50, 0.55]],
    np.float32)

# Stream tags keep the random streams for identities, photos and noise disjoint.
_IDENTITY_STREAM, _PHOTO_STREAM, _NOISE_STREAM = 0, 1, 2


@dataclass(frozen=True)
class Identity:
    """What makes a face *this person*: stays fixed across all their photos."""

    face_width: float
    face_height: float
    jaw: float
    skin: tuple[float, float, float]
    eye_spacing: float
    eye_size: float
    eye_height: float
    iris: tuple[float, float, float]
    brow_thickness: float
    brow_tilt: float
    nose_length: float
    nose_width: float
    mouth_width: float
    lip: tuple[float, float, float]
    hair_style: int  # 0 short, 1 medium, 2 long, 3 bald
    hair: tuple[float, float, float]
    fringe: float
    glasses: bool
    frame: tuple[float, float, float]

    @classmethod
    def sample(cls, seed: int, identity: int) -> Identity:
        rng = np.random.default_rng([seed, _IDENTITY_STREAM, identity])
        tone = rng.uniform()
        skin = (1 - tone) * _SKIN_LIGHT + tone * _SKIN_DARK + rng.normal(0, 0.02, 3)
        hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 0.03, 3)
        lip = skin * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 0.03, 3)
        glasses = bool(rng.uniform() < 0.25)
        return cls(
            face_width=float(rng.uniform(0.46, 0.60)),
            face_height=float(rng.uniform(0.60, 0.74)),
            jaw=float(rng.uniform(0.0, 0.35)),
            skin=_rgb(skin),
            eye_spacing=float(rng.uniform(0.15, 0.23)),
            eye_size=float(rng.uniform(0.05, 0.08)),
            eye_height=float(rng.uniform(-0.14, -0.05)),
            iris=_rgb(_IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 0.03, 3)),
            brow_thickness=float(rng.uniform(0.018, 0.045)),
            brow_tilt=float(rng.uniform(-0.35, 0.35)),
            nose_length=float(rng.uniform(0.10, 0.20)),
            nose_width=float(rng.uniform(0.035, 0.075)),
            mouth_width=float(rng.uniform(0.11, 0.20)),
            lip=_rgb(lip),
            hair_style=int(rng.integers(4)),
            hair=_rgb(hair),
            fringe=float(rng.uniform(0.35, 0.75)),
            glasses=glasses,
            frame=_rgb(rng.uniform(0.0, 0.6, 3)),
        )


@dataclass(frozen=True)
class Attributes:
    """What varies between photos of one person: pose, expression, light, scene."""

    yaw: float  # -1 (looking left) .. 1 (right)
    pitch: float  # -1 (up) .. 1 (down)
    smile: float  # 0 .. 1
    light_x: float  # -1 (lit from the left) .. 1 (right)
    light_y: float  # -1 (from above) .. 1 (below)
    light_intensity: float
    background: tuple[float, float, float]
    background_gradient: float
    noise_sigma: float
    noise_seed: int

    @classmethod
    def sample(cls, seed: int, identity: int, index: int) -> Attributes:
        rng = np.random.default_rng([seed, _PHOTO_STREAM, identity, index])
        return cls(
            yaw=float(rng.uniform(-1, 1)),
            pitch=float(rng.uniform(-1, 1)),
            smile=float(rng.uniform(0, 1)),
            light_x=float(rng.uniform(-1, 1)),
            light_y=float(rng.uniform(-0.8, 0.4)),
            light_intensity=float(rng.uniform(0.65, 1.25)),
            background=_rgb(rng.uniform(0.1, 0.9, 3)),
            background_gradient=float(rng.uniform(-0.25, 0.25)),
            noise_sigma=float(rng.uniform(0.0, 0.03)),
            noise_seed=int(rng.integers(2**31)),
        )

    def replace(self, **changes: float) -> Attributes:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Attributes(**values)


def _rgb(values: np.ndarray) -> tuple[float, float, float]:
    clipped = np.clip(values, 0.0, 1.0)
    return (float(clipped[0]), float(clipped[1]), float(clipped[2]))


def _stack(items: list, name: str) -> np.ndarray:
    """One field of a list of dataclasses as a broadcastable (N, 1|3, 1, 1) array."""
    values = np.asarray([getattr(item, name) for item in items], np.float32)
    if values.ndim == 2:  # colours: channel-first
        return values[:, :, None, None]
    return values[:, None, None, None]


def _soft(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (negative = inside)."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def _ellipse(x, y, cx, cy, a, b, pixel):
    d = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return _soft((d - 1.0) * np.minimum(a, b), pixel)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray | float) -> None:
    """Alpha-composite ``colour`` over ``canvas`` in place where ``mask`` covers.

    Channel-first with a lerp (``canvas += mask * (colour - canvas)``) and an early
    exit for empty masks: this is the renderer's hot loop.
    """
    if not mask.any():
        return
    delta = np.subtract(colour, canvas, dtype=np.float32)
    delta *= mask
    canvas += delta


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRIDS:
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        _GRIDS[size] = (axis[None, None, None, :], axis[None, None, :, None])
    return _GRIDS[size]


def _pixel_span(low: float, high: float, size: int) -> tuple[int, int]:
    """Pixel index range [start, stop) covering coordinates [low, high] plus a margin."""
    start = int(np.floor((low + 1.0) / 2.0 * size)) - 1
    stop = int(np.ceil((high + 1.0) / 2.0 * size)) + 1
    return max(start, 0), min(stop, size)


def check_size(size: int) -> int:
    if not (MIN_SIZE <= int(size) <= MAX_SIZE):
        raise ValueError(
            f"SynthFaces image size must be between {MIN_SIZE} and {MAX_SIZE} pixels, "
            f"got {size}; set data.image_size to a value in that range."
        )
    return int(size)


def render(
    identities: Identity | list[Identity], attributes: list[Attributes], size: int = 64
) -> np.ndarray:
    """Render a batch of faces as float32 ``(N, 3, size, size)`` in [0, 1].

    ``identities`` is either one identity for every image or one per image.
    """
    size = check_size(size)
    n = len(attributes)
    if isinstance(identities, Identity):
        identities = [identities] * n
    if len(identities) != n:
        raise ValueError(f"got {len(identities)} identities for {n} attribute sets")
    ids = {f.name: _stack(identities, f.name) for f in fields(Identity)}
    att = {f.name: _stack(attributes, f.name) for f in fields(Attributes)}
    x, y = _grid(size)
    px = 2.0 / size

    # Scene: background with a vertical gradient.
    img = np.empty((n, 3, size, size), np.float32)
    img[:] = att["background"] * (1.0 + att["background_gradient"] * y)

    yaw, pitch, smile = att["yaw"], att["pitch"], att["smile"]
    # Head outline: moves a little with pose, narrows when turned (2.5-D).
    cx = yaw * 0.07
    cy = 0.08 + pitch * 0.05
    a = ids["face_width"] * (1.0 - 0.12 * np.abs(yaw))
    b = ids["face_height"]
    style = ids["hair_style"]

    # Hair behind the head (medium and long styles).
    long_hair = (style == 2).astype(np.float32)
    medium_hair = (style == 1).astype(np.float32)
    back_b = b * (1.05 + 0.35 * long_hair)
    back = _ellipse(x, y, cx, cy + 0.18 * long_hair, a * 1.18, back_b, px)
    back *= (medium_hair + long_hair) * (y < cy + 0.55 + 0.4 * long_hair)
    _paint(img, back, ids["hair"])

    # Everything below lies on or just around the head: draw it on a crop that
    # covers every head in the batch (about half the frame), which halves the work.
    r0, r1 = _pixel_span((cy - 1.12 * b).min(), (cy + 1.02 * b).max(), size)
    c0, c1 = _pixel_span((cx - 1.15 * a).min(), (cx + 1.15 * a).max(), size)
    xc, yc = x[..., c0:c1], y[..., r0:r1, :]
    view = img[:, :, r0:r1, c0:c1]

    # Face with a jaw that narrows the lower half.
    dy = yc - cy
    jaw_scale = 1.0 - ids["jaw"] * np.clip(dy / b, 0.0, 1.0)
    aj = a * jaw_scale
    face_d = np.sqrt(((xc - cx) / aj) ** 2 + (dy / b) ** 2)
    face = _soft((face_d - 1.0) * np.minimum(aj, b), px)

    # Lambertian shading on an ellipsoid normal.
    nx = np.clip((xc - cx) / aj, -1, 1)
    ny = np.clip(dy / b, -1, 1)
    nz = np.sqrt(np.clip(1.0 - nx**2 - ny**2, 0.0, 1.0))
    lx, ly = att["light_x"], att["light_y"]
    norm = np.sqrt(lx**2 + ly**2 + 0.8**2)
    diffuse = np.clip((nx * lx + ny * ly + nz * 0.8) / norm, 0.0, 1.0)
    shade = att["light_intensity"] * (0.45 + 0.6 * diffuse)

    # Everything on the face is drawn on its own layer, then lit and composited.
    skin = np.empty_like(view)
    skin[:] = ids["skin"]
    fx = cx + yaw * 0.13  # features turn further than the outline
    fy = cy + pitch * 0.09

    # Eyes: sclera, iris looking with the head, pupil.
    spacing = ids["eye_spacing"] * (1.0 - 0.25 * np.abs(yaw))
    ey = fy + ids["eye_height"]
    es = ids["eye_size"]
    for side in (-1.0, 1.0):
        ex = fx + side * spacing
        _paint(skin, _ellipse(xc, yc, ex, ey, es * 1.3, es * 0.75, px), np.float32(0.95))
        ix = ex + yaw * es * 0.35
        _paint(skin, _ellipse(xc, yc, ix, ey, es * 0.6, es * 0.6, px), ids["iris"])
        _paint(skin, _ellipse(xc, yc, ix, ey, es * 0.28, es * 0.28, px), np.float32(0.03))
        # Brow: a tilted bar above the eye, raised a little by a smile.
        by = ey - es * 1.6 - smile * 0.02 + side * ids["brow_tilt"] * (xc - ex)
        brow = _soft(np.abs(yc - by) - ids["brow_thickness"], px)
        brow *= _soft(np.abs(xc - ex) - es * 1.5, px)
        _paint(skin, brow, ids["hair"] * 0.8)
        # Glasses frame (zero coverage for identities without glasses).
        ring_d = np.sqrt((xc - ex) ** 2 + (yc - ey) ** 2)
        ring = _soft(np.abs(ring_d - es * 1.75) - 0.012, px) * ids["glasses"]
        _paint(skin, ring, ids["frame"])

    # Bridge of the glasses.
    bridge = _soft(np.abs(yc - ey) - 0.01, px) * _soft(np.abs(xc - fx) - spacing * 0.45, px)
    _paint(skin, bridge * ids["glasses"], ids["frame"])

    # Nose: a soft darker wedge that follows the yaw.
    nose_x = fx + yaw * 0.04
    nose_top = ey + es
    t = np.clip((yc - nose_top) / ids["nose_length"], 0.0, 1.0)
    nose_w = ids["nose_width"] * (0.3 + 0.7 * t)
    nose = _soft(np.abs(xc - nose_x) - nose_w, px) * ((yc > nose_top) & (t < 1.0))
    _paint(skin, nose * 0.45, ids["skin"] * 0.72)

    # Mouth: a curve whose corners rise with the smile; teeth show on big smiles.
    mw = ids["mouth_width"] * (1.0 + 0.25 * smile)
    my = nose_top + ids["nose_length"] + 0.09
    u = np.clip((xc - fx) / mw, -1.0, 1.0)
    centre = my + smile * 0.06 * (1.0 - u**2) - smile * 0.03
    inside_width = _soft(np.abs(xc - fx) - mw, px)
    lips = _soft(np.abs(yc - centre) - 0.022 * (1.0 - u**2) - 0.008, px) * inside_width
    _paint(skin, lips, ids["lip"])
    teeth = _soft(np.abs(yc - centre) - 0.012 * (1.0 - u**2) * np.clip(smile * 2 - 1, 0, 1), px)
    _paint(skin, teeth * inside_width * (smile > 0.5), np.float32(0.92))

    skin *= shade
    _paint(view, face, skin)

    # Hair on top of the head: a cap above the fringe line (not for bald).
    has_hair = (style != 3).astype(np.float32)
    fringe_y = cy - b * ids["fringe"]
    cap = _ellipse(xc, yc, cx, cy - 0.02, a * 1.1, b * 1.08, px)
    cap *= _soft(yc - fringe_y, px) * has_hair
    hair_lit = ids["hair"] * (0.7 + 0.3 * shade)
    _paint(view, cap, hair_lit)

    # Sensor noise, reproducible per photo.
    sigma = att["noise_sigma"][:, 0, 0, 0]
    for i, attr in enumerate(attributes):
        if sigma[i] > 0:
            rng = np.random.default_rng([_NOISE_STREAM, attr.noise_seed])
            img[i] += rng.standard_normal((3, size, size), np.float32) * sigma[i]

    np.clip(img, 0.0, 1.0, out=img)
    return img
