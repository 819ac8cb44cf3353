"""Reading one photo from disk into the model's format, robustly.

Real photo folders hold every kind of file: truncated downloads, text files,
greyscale scans, CMYK JPEGs from print workflows, PNGs with transparency,
thumbnails. One bad file must never stop a run. ``read_face`` either returns the
face as float32 ``(3, S, S)`` in [0, 1], noting any conversion it made, or raises
``UnusablePhoto`` with a reason that the loader counts and reports.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Smaller than this (shorter side, pixels) is a thumbnail, not a photo to learn from.
MIN_SIDE = 24


class UnusablePhoto(Exception):
    """A file that cannot be used as a photo; the message says why."""


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """RGB image and a note of the conversion made ("" if none)."""
    mode = image.mode
    if mode == "RGB":
        return image, ""
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} with alpha over white"
    if mode.startswith("I") or mode == "F":  # 16/32-bit greyscale: rescale to 8 bits
        values = np.asarray(image, dtype=np.float64)
        top = values.max() or 1.0
        grey = Image.fromarray((values / top * 255.0).astype(np.uint8), "L")
        return grey.convert("RGB"), f"{mode} greyscale to RGB"
    if mode in ("L", "1"):
        return image.convert("RGB"), "greyscale to RGB"
    return image.convert("RGB"), f"{mode} to RGB"


def square_box(width: int, height: int, box: tuple[float, float, float, float] | None,
               crop: float) -> tuple[float, float, float, float]:
    """A square crop inside the image: ``box`` moved (and shrunk if need be) to fit,
    or a centred square of ``crop`` x the shorter side."""
    if box is None:
        side = min(width, height) * crop
        cx, cy = width / 2, height / 2
    else:
        side = min(box[2] - box[0], width, height)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    return (left, top, left + side, top + side)


def read_face(path: str | Path, size: int,
              box: tuple[float, float, float, float] | None = None,
              crop: float = 1.0) -> tuple[np.ndarray, str]:
    """Decode ``path``, crop the face and resize to ``size`` x ``size``.

    ``box`` is a face box (left, top, right, bottom) in pixels, e.g. from
    landmarks; otherwise a centred square of ``crop`` x the shorter side is used.
    Returns ``(image, conversion note)``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()  # decodes now: a truncated file fails here, not later
                image = ImageOps.exif_transpose(opened)
    except UnidentifiedImageError:
        raise UnusablePhoto("not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnusablePhoto("image too large to decode safely") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated or corrupt image" if "truncat" in str(err) or isinstance(
            err, SyntaxError) else f"unreadable ({type(err).__name__}: {err})"
        raise UnusablePhoto(reason) from None
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise UnusablePhoto(f"too small ({width}x{height}; at least {MIN_SIDE} px a side)")
    image, note = _to_rgb(image)
    face = image.resize((size, size), Image.Resampling.BICUBIC,
                        box=square_box(width, height, box, crop))
    array = np.asarray(face, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.clip(array, 0.0, 1.0), note
