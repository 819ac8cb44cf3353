"""A real device's own photos: one flat folder, named by the SuperNode's node config.

In a deployment each device holds only its owner's photos, in the directory the
SuperNode was started with (``--node-config "data-dir=/path"``)::

    data-dir/IMG_0001.jpg
    data-dir/IMG_0002.png
    data-dir/controls.csv      optional: file,yaw,pitch,smile[,light_x,light_y] (portrait)
    data-dir/consent.json      the owner's consent manifest (docs/consent.md)

The server never sees this directory: ``data=device`` tells devices to read their
own, and ``fleet.num_devices`` says how many SuperNodes take part. Every other
rule (bad files, the stable split, exclusion) is the on-disk sources' own
(``fl.data.device_data.load_files``).
"""

from __future__ import annotations

from pathlib import Path

from fl.data.device_data import DeviceData, load_labelled, register_source
from fl.data.folders import read_controls

CONTROLS_FILE = "controls.csv"
NOT_PHOTOS = {CONTROLS_FILE, "consent.json"}


def _load(spec, device: int) -> DeviceData:
    root = Path(spec.root)
    if not spec.root or not root.is_dir():
        raise ValueError(
            f"data=device reads the device's own photo directory, and {spec.root!r} is not "
            "one; start the SuperNode with --node-config \"data-dir=/path/to/photos\"")
    labels = read_controls(str(root / CONTROLS_FILE)) if (root / CONTROLS_FILE).is_file() else None
    names = sorted(p.name for p in root.iterdir() if p.is_file()
                   and not p.name.startswith(".") and p.name not in NOT_PHOTOS)
    return load_labelled(spec, root, names, labels, CONTROLS_FILE, f"device {device}")


register_source("device", lambda spec: spec.num_devices, _load)
