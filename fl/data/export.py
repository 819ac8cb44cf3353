"""Write SynthFaces identities to disk in real datasets' layouts.

Why: the on-disk loaders (``fl.data.celeba``, ``fl.data.folders``) and the
deployment path need real image files, and nothing can be downloaded here. An
exported set exercises exactly the code that reads CelebA or LFW, with the
benefit that the ground truth is known. ``python -m experiments.export_data``
is the command-line way in; the tests build their datasets with it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from fl.data import celeba
from fl.data.controls import CONTROL_NAMES, from_attributes
from fl.data.synthfaces import Attributes, Identity, render

EXPORT_ID_OFFSET = 3_000_000  # exported identities: disjoint from devices, public, clips
CELEBA_SIZE = (178, 218)  # width, height of CelebA's aligned images


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0))


def _photos(seed: int, person: int, count: int, size: int):
    identity = Identity.sample(seed, EXPORT_ID_OFFSET + person)
    attrs = [Attributes.sample(seed, EXPORT_ID_OFFSET + person, k) for k in range(count)]
    return identity, attrs, render(identity, attrs, size)


def landmarks(identity: Identity, a: Attributes, size: int) -> np.ndarray:
    """Five CelebA-style landmarks (eyes, nose tip, mouth corners) in pixels, from
    the renderer's geometry (``fl.data.synthfaces.render``)."""
    cx, cy = a.yaw * 0.07, 0.08 + a.pitch * 0.05
    fx, fy = cx + a.yaw * 0.13, cy + a.pitch * 0.09
    spacing = identity.eye_spacing * (1.0 - 0.25 * abs(a.yaw))
    ey = fy + identity.eye_height
    nose_top = ey + identity.eye_size
    nose = (fx + a.yaw * 0.04, nose_top + identity.nose_length)
    my = nose_top + identity.nose_length + 0.09
    mw = identity.mouth_width * (1.0 + 0.25 * a.smile)
    points = np.array([[fx - spacing, ey], [fx + spacing, ey], nose, [fx - mw, my],
                       [fx + mw, my]])
    return (points + 1.0) / 2.0 * size


def export_folders(root: str | Path, people: int, photos: int, seed: int = 0, size: int = 96,
                   controls_csv: bool = True, fmt: str = "jpg") -> Path:
    """``root/Person_0000/Person_0000_0001.jpg`` ... and, optionally, ``controls.csv``."""
    root = Path(root)
    rows = []
    for person in range(people):
        name = f"Person_{person:04d}"
        (root / name).mkdir(parents=True, exist_ok=True)
        _, attrs, images = _photos(seed, person, photos, size)
        controls = from_attributes(attrs)
        for k, image in enumerate(images):
            file = f"{name}/{name}_{k + 1:04d}.{fmt}"
            _to_pil(image).save(root / file, quality=95)
            rows.append([file, *controls[k].tolist()])
    if controls_csv:
        with (root / "controls.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", *CONTROL_NAMES])
            writer.writerows(rows)
    return root


def export_celeba(root: str | Path, people: int, photos: int, seed: int = 0) -> Path:
    """A CelebA-layout directory: aligned 178x218 JPEGs and the three list files."""
    root = Path(root)
    (root / celeba.IMAGES).mkdir(parents=True, exist_ok=True)
    width, height = CELEBA_SIZE
    face = 128
    left, top = (width - face) // 2, (height - face) // 2
    ids, attrs_lines, mark_lines = [], [], []
    attr_names = ["Eyeglasses", "Smiling", "Young"]
    number = 0
    for person in range(people):
        identity, attrs, images = _photos(seed, person, photos, face)
        for a, image in zip(attrs, images):
            number += 1
            file = f"{number:06d}.jpg"
            canvas = Image.new("RGB", (width, height), tuple(int(c * 255) for c in a.background))
            canvas.paste(_to_pil(image), (left, top))
            canvas.save(root / celeba.IMAGES / file, quality=95)
            ids.append(f"{file} {person + 1}")
            flags = [identity.glasses, a.smile > 0.5, True]
            attrs_lines.append(f"{file} " + " ".join(" 1" if f else "-1" for f in flags))
            marks = landmarks(identity, a, face) + [left, top]
            mark_lines.append(f"{file} " + " ".join(f"{v:.0f}" for v in marks.ravel()))
    (root / celeba.IDENTITIES).write_text("\n".join(ids) + "\n")
    (root / celeba.ATTRIBUTES).write_text(
        f"{number}\n{' '.join(attr_names)}\n" + "\n".join(attrs_lines) + "\n")
    (root / celeba.LANDMARKS).write_text(
        f"{number}\n{' '.join(celeba.LANDMARK_NAMES)}\n" + "\n".join(mark_lines) + "\n")
    return root
