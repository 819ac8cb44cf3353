"""Find the face in a photo and crop it the way the model's training images are framed.

Why OpenCV's Haar cascades: they ship inside the ``opencv-python-headless`` 4.x
wheel (``cv2.data.haarcascades``), so detection works offline with nothing to
download, and they are a decades-old, well-kept detector. (OpenCV 5 dropped the
cascades from the wheel; the ``faces`` extra pins 4.x.) Better detectors (YuNet,
RetinaFace) need model files fetched from elsewhere.

Settings, measured on 100 exported SynthFaces JPEGs (10 identities, 128 px) and
12 scikit-image pictures without a face (coffee, rocket, a cat, coins, text,
textures): the ``alt2`` cascade on a contrast-equalised image (CLAHE), upscaled so
the shorter side is at least 192 px, ``minNeighbors=2``, found a face in 63 of
100 renders and fired on 1 of the 12 (the coins); without CLAHE 51 renders, and
the ``default`` cascade found fewer and fired more. The renders are cartoons and
recall varies by identity (from 0 to 10 of 10: dark, low-contrast faces are missed
most): files without a detected face are skipped and said so, never guessed at.

**Framing.** A model learns faces framed as SynthFaces renders them, so a crop
must frame a detected face the same way. On those renders the ``alt2`` box is
centred on the image (mean centre 0.51, 0.50 of the side) and 0.46 of its side
wide; a crop ``FRAMING`` = 1 / 0.46 times the box, centred on the box, therefore
reproduces the renders' framing, and applies it to any photo.

``cv2`` is imported here only: ``clients.app`` (a device's per-message process)
never pays for it (``tests/clients/test_light_import.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fl.data.images import UnusablePhoto, read_face

CASCADE = "haarcascade_frontalface_alt2.xml"
DETECT_SIDE = 192  # upscale smaller images to this shorter side before detecting
MIN_FACE = 0.2  # smallest face searched for, as a share of the shorter side
FRAMING = 1 / 0.46  # crop side / detected box side (calibrated on renders, above)


class NoFace(UnusablePhoto):
    """A readable photo in which no face was found."""


@dataclass(frozen=True)
class Face:
    path: Path
    image: np.ndarray  # (3, S, S) float32 in [0, 1], framed like the training images
    box: tuple[float, float, float, float]  # the detected face (left, top, right, bottom)
    note: str = ""  # a conversion made while decoding ("" if none)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise RuntimeError("face detection needs OpenCV: pip install 'fedface[faces]' "
                           "(opencv-python-headless 4.x)") from None
    return cv2


@lru_cache(maxsize=1)
def _detector():
    cv2 = _cv2()
    path = Path(cv2.data.haarcascades) / CASCADE
    detector = cv2.CascadeClassifier(str(path))
    if detector.empty():
        raise RuntimeError(f"OpenCV's {CASCADE} is missing from {path.parent}; install "
                           "opencv-python-headless 4.x (5.0 no longer ships the cascades)")
    return detector


def _grey(path: Path) -> np.ndarray:
    """The photo upright (EXIF orientation applied) as 8-bit grey: what
    ``read_face`` crops from."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        return np.asarray(ImageOps.exif_transpose(opened).convert("L"), dtype=np.uint8)


def detect(grey: np.ndarray) -> tuple[float, float, float, float] | None:
    """The largest face in an 8-bit grey image, as (left, top, right, bottom)
    pixels, or None."""
    cv2 = _cv2()
    scale = max(1.0, DETECT_SIDE / min(grey.shape))
    image = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC) \
        if scale > 1 else grey
    image = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image)
    smallest = int(MIN_FACE * min(image.shape))
    boxes = _detector().detectMultiScale(image, scaleFactor=1.05, minNeighbors=2,
                                         minSize=(smallest, smallest))
    if len(boxes) == 0:
        return None
    x, y, w, h = (float(v) / scale for v in max(boxes, key=lambda b: b[2] * b[3]))
    return (x, y, x + w, y + h)


def framed(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """The crop around a detected face that frames it like a render."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = (box[2] - box[0]) * FRAMING / 2
    return (cx - half, cy - half, cx + half, cy + half)


def crop_face(path: str | Path, size: int) -> Face:
    """Decode ``path``, find its face and crop it to ``size`` x ``size``.

    Raises ``UnusablePhoto`` (not an image, corrupt, too small) or ``NoFace``;
    the message says which. A crop that would leave the image is moved (and, if
    need be, shrunk) to fit inside it (``fl.data.images.square_box``).
    """
    path = Path(path)
    read_face(path, size)  # every decoding problem is reported as read_face words it
    box = detect(_grey(path))
    if box is None:
        raise NoFace("no face found")
    image, note = read_face(path, size, box=framed(box))
    return Face(path, image, box, note)


def photo_files(folder: str | Path, besides: tuple[str, ...] = ()) -> list[Path]:
    """Candidate photos of a folder of selfies, by name: every regular file but
    hidden ones and ``besides`` (e.g. a controls CSV), so a stray file is
    reported as skipped rather than silently passed over, as the on-disk data
    sources do (``fl.data.folders``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of photos")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in besides)
