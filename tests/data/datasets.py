"""Tiny datasets in real on-disk layouts, built on the fly from SynthFaces renders,
plus deliberately broken files of every kind a real photo folder holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Files a loader must skip, and files it must convert to RGB.
BROKEN = ("truncated.jpg", "not_an_image.jpg", "notes.txt", "tiny.png")
CONVERTED = ("grey.png", "cmyk.jpg", "alpha.png", "grey16.png")


def add_broken_files(folder: Path, good: Path) -> None:
    """Write unusable files and convertible ones next to good photos in ``folder``."""
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "not_an_image.jpg").write_text("this is not a JPEG")
    (folder / "notes.txt").write_text("holiday 2019")
    Image.new("RGB", (8, 8), (200, 100, 50)).save(folder / "tiny.png")
    face = Image.open(good).convert("RGB")
    face.convert("L").save(folder / "grey.png")
    face.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = face.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    grey16 = (np.asarray(face.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")  # 16-bit greyscale PNG
