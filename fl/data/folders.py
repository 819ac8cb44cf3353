"""Per-identity folders from disk (the LFW layout): ``root/Person_Name/*.jpg``.

One device per folder with at least ``photos_min + heldout_photos`` files, in
name order. Every regular file in a folder is a candidate photo (hidden files
excepted), so a stray text file is counted as skipped rather than silently
ignored. The face is a centred square crop of ``data.crop`` x the shorter side
(LFW: about 0.5).

Portrait controls come from an optional CSV (``data.controls_csv``) with a
header ``file,yaw,pitch,smile[,light_x,light_y]`` and ``file`` relative to
root; light direction is estimated from the image where the CSV has none.
Without the CSV the folders serve the swap task only (config validation says so
when ``task=portrait`` is asked for). With it, photos without a row are skipped.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

from fl.data.controls import CONTROL_NAMES
from fl.data.device_data import DeviceData, load_labelled, register_source

REQUIRED_COLUMNS = ("file", "yaw", "pitch", "smile")


@lru_cache(maxsize=4)
def folders(root: str) -> dict[str, tuple[str, ...]]:
    """Folder name -> its candidate files (relative to root), sorted."""
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"data.root={root!r} is not a directory; point it at the "
                                "folder holding one sub-folder per person")
    table = {}
    for person in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f"{person.name}/{f.name}" for f in person.iterdir()
                       if f.is_file() and not f.name.startswith("."))
        table[person.name] = tuple(files)
    return table


def eligible(root: str, need: int) -> list[str]:
    return [name for name, files in folders(root).items() if len(files) >= need]


@lru_cache(maxsize=4)
def read_controls(path: str) -> dict[str, tuple[float, ...]]:
    """The controls CSV: file -> (yaw, pitch, smile[, light_x, light_y])."""
    csv_path = Path(path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"data.controls_csv={path!r} does not exist")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = tuple(reader.fieldnames or ())
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path} lacks columns {missing}; its header must be "
                             f"file,{','.join(CONTROL_NAMES[:3])}[,light_x,light_y]")
        names = [c for c in CONTROL_NAMES if c in columns]
        rows = {}
        for number, row in enumerate(reader, 2):
            try:
                rows[row["file"]] = tuple(float(row[c]) for c in names)
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{number}: controls must be numbers, got "
                                 f"{[row.get(c) for c in names]}") from None
    return rows


def _count(spec) -> int:
    return len(eligible(spec.root, spec.photos_min + spec.heldout_photos))


def _load(spec, device: int) -> DeviceData:
    root = Path(spec.root)
    person = eligible(spec.root, spec.photos_min + spec.heldout_photos)[device]
    labels = read_controls(spec.controls_csv) if spec.controls_csv else None
    return load_labelled(spec, root, folders(spec.root)[person], labels, "data.controls_csv",
                         f"folders device {device}")


register_source("folders", _count, _load)
