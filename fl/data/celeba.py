"""CelebA from disk, in its published layout.

::

    root/img_align_celeba/000001.jpg ...
    root/identity_CelebA.txt              "000001.jpg 2880"
    root/list_attr_celeba.txt             count, header of 40 names, "000001.jpg -1 1 ..."
    root/list_landmarks_align_celeba.txt  count, header, "000001.jpg 69 109 106 113 77 142 ..."

One device per celebrity with at least ``photos_min + heldout_photos`` photos
listed, in order of identity number. Portrait controls are *proxies*: smile is
the ``Smiling`` attribute; yaw is the nose's horizontal offset from the midline
of eyes and mouth, pitch the nose's height between eyes and mouth (both scaled
to SynthFaces' [-1, 1]); light direction is estimated from the image. The face is
cropped to a square around the landmarks and resized.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from fl.data.device_data import DeviceData, PhotoFile, load_files, register_source

IMAGES = "img_align_celeba"
IDENTITIES = "identity_CelebA.txt"
ATTRIBUTES = "list_attr_celeba.txt"
LANDMARKS = "list_landmarks_align_celeba.txt"
LANDMARK_NAMES = ("lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
                  "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y")
BOX_SCALE = 4.6  # face box side, in units of the larger of eye distance and eye-mouth distance


def _require(root: Path) -> None:
    missing = [name for name in (IMAGES, IDENTITIES, ATTRIBUTES, LANDMARKS)
               if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"data.root={str(root)!r} is not a CelebA directory: missing {missing}. Point "
            f"data.root at the folder holding {IMAGES}/ and the three list files.")


@lru_cache(maxsize=4)
def identities(root: str) -> dict[int, tuple[str, ...]]:
    """Identity number -> its image file names, in file order."""
    path = Path(root)
    _require(path)
    table: dict[int, list[str]] = {}
    for number, line in enumerate((path / IDENTITIES).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path / IDENTITIES}:{number}: expected '<file> <identity>', "
                             f"got {line!r}")
        table.setdefault(int(parts[1]), []).append(parts[0])
    return {k: tuple(v) for k, v in sorted(table.items())}


@lru_cache(maxsize=8)
def _table(path: str) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    """A CelebA list file: (column names, file name -> integer row)."""
    lines = Path(path).read_text().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path} has no header; is it a CelebA list file?")
    header = tuple(lines[1].split())
    rows = {}
    for line in lines[2:]:
        parts = line.split()
        if len(parts) == len(header) + 1:
            rows[parts[0]] = tuple(int(v) for v in parts[1:])
    return header, rows


def eligible(root: str, need: int) -> list[int]:
    return [k for k, files in identities(root).items() if len(files) >= need]


def controls_and_box(landmarks: np.ndarray, smiling: int) -> tuple[tuple[float, ...],
                                                                    tuple[float, ...]]:
    """(yaw, pitch, smile) proxies and a square face box from five landmarks."""
    le, re, nose, lm, rm = landmarks.reshape(5, 2).astype(np.float64)
    eyes, mouth = (le + re) / 2, (lm + rm) / 2
    iod = float(np.linalg.norm(re - le)) or 1.0
    eye_mouth = float(mouth[1] - eyes[1]) or 1.0
    midline_x = (eyes[0] + mouth[0]) / 2
    yaw = float(np.clip(2.5 * (nose[0] - midline_x) / iod, -1, 1))
    pitch = float(np.clip(4.0 * ((nose[1] - eyes[1]) / eye_mouth - 0.55), -1, 1))
    smile = 1.0 if smiling > 0 else 0.0
    centre = (eyes + mouth) / 2
    half = BOX_SCALE * max(iod, abs(eye_mouth)) / 2
    box = (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half)
    return (yaw, pitch, smile), box


def _count(spec) -> int:
    return len(eligible(spec.root, spec.photos_min + spec.heldout_photos))


def _load(spec, device: int) -> DeviceData:
    root = Path(spec.root)
    person = eligible(spec.root, spec.photos_min + spec.heldout_photos)[device]
    attr_names, attrs = _table(str(root / ATTRIBUTES))
    if "Smiling" not in attr_names:
        raise ValueError(f"{root / ATTRIBUTES} has no 'Smiling' column")
    _, marks = _table(str(root / LANDMARKS))
    smiling = attr_names.index("Smiling")
    files, unlabelled = [], []
    for name in identities(spec.root)[person]:
        path = root / IMAGES / name
        if name not in attrs or name not in marks:
            unlabelled.append((name, "no row in the attribute or landmark list"))
            continue
        controls, box = controls_and_box(np.asarray(marks[name]), attrs[name][smiling])
        files.append(PhotoFile(name, path, controls, box))
    return load_files(spec, files, f"CelebA device {device}", tuple(unlabelled))


register_source("celeba", _count, _load)
