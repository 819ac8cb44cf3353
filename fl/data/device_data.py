"""What one device holds: its photos, their ids and controls, and what was unusable.

Every data source (SynthFaces, CelebA, per-identity folders) produces the same
``DeviceData``, so tasks, consent and the trainer never ask where photos came
from. Sources register themselves by ``data.source``; each maps a device index to
one identity (one user) and loads only that identity's photos, the way a real
device only has its owner's.

Decoded photos are cached per process, because a simulation worker serves many
rounds of the same devices. ``forget`` drops a device's copy: "delete my data"
uses it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fl.data.controls import NUM_CONTROLS, check_controls, light_from_images
from fl.data.synthfaces import Identity

log = logging.getLogger("fedface.data")


@dataclass(frozen=True)
class DeviceData:
    """One device's photos, split into training and held-out (evaluation) photos.

    ``*_controls`` are ``(n, 5)`` portrait controls (``fl.data.controls``), or
    ``None`` where the source has no labels. ``identity`` is the SynthFaces
    ground truth when the photos are renders (exact evaluation targets exist),
    ``None`` for real photos.
    """

    train: np.ndarray  # (n, 3, S, S) float32 in [0, 1]
    train_ids: tuple[str, ...]
    heldout: np.ndarray
    heldout_ids: tuple[str, ...]
    train_controls: np.ndarray | None = None
    heldout_controls: np.ndarray | None = None
    identity: Identity | None = None
    skipped: tuple[tuple[str, str], ...] = ()  # (photo id, reason)
    converted: tuple[tuple[str, str], ...] = ()  # (photo id, conversion)
    excluded: str = ""  # why this device cannot take part at all ("" if it can)

    def select(self, train_keep: Sequence[bool], heldout_keep: Sequence[bool]) -> DeviceData:
        """The photos kept by two masks (e.g. the ones consented to)."""
        t, h = np.asarray(train_keep, bool), np.asarray(heldout_keep, bool)
        return replace(
            self, train=self.train[t], heldout=self.heldout[h],
            train_ids=tuple(i for i, k in zip(self.train_ids, t) if k),
            heldout_ids=tuple(i for i, k in zip(self.heldout_ids, h) if k),
            train_controls=None if self.train_controls is None else self.train_controls[t],
            heldout_controls=None if self.heldout_controls is None else self.heldout_controls[h])


# --- sources ----------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A registered data source: how many devices it has, and one device's photos."""

    count: Callable  # (spec) -> number of eligible devices
    load: Callable  # (spec, device) -> DeviceData


_SOURCES: dict[str, Source] = {}


def register_source(name: str, count: Callable, load: Callable) -> None:
    _SOURCES[name] = Source(count, load)


def source_names() -> list[str]:
    _import_sources()
    return sorted(_SOURCES)


def _source(name: str) -> Source:
    _import_sources()
    if name not in _SOURCES:
        raise ValueError(f"data.source={name!r} is not a data source; choose one of "
                         f"{sorted(_SOURCES)}")
    return _SOURCES[name]


def _import_sources() -> None:
    from fl.data import celeba, fleet, folders, own_folder  # noqa: F401  (they register themselves)


def available_devices(spec) -> int:
    """Devices the source can form (identities with enough photos listed)."""
    return _source(spec.source).count(spec)


_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 256


def load_device_data(spec, device: int) -> DeviceData:
    """Device ``device``'s photos (cached per process)."""
    if not 0 <= device < spec.num_devices:
        raise ValueError(f"device {device} is outside the fleet of {spec.num_devices}")
    key = (spec, device)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    data = _source(spec.source).load(spec, device)
    _CACHE[key] = data
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return data


def forget(spec, device: int) -> None:
    """Drop this process's decoded copy of a device's photos."""
    _CACHE.pop((spec, device), None)


def is_cached(spec, device: int) -> bool:
    return (spec, device) in _CACHE


def hold(spec, device: int, data: DeviceData) -> None:
    """Make ``data`` this process's copy of a device's photos until it is
    forgotten or evicted. Only the audit's own ClientApp calls it, to plant
    canary photos (``clients.audit``); a normal run has no way to reach it."""
    _CACHE[(spec, device)] = data
    _CACHE.move_to_end((spec, device))


# --- shared by the on-disk sources -----------------------------------------------

@dataclass(frozen=True)
class PhotoFile:
    photo_id: str  # path relative to the dataset root: stable, and what consent names
    path: Path
    controls: tuple[float, ...] | None = None  # labelled (yaw, pitch, smile[, light_x, light_y])
    box: tuple[float, float, float, float] | None = None  # face box in pixels


def stable_order(photo_ids: Sequence[str], seed: int) -> list[int]:
    """A fixed pseudo-random order of a device's photos (the train/held-out split
    must not move when a file is added to or removed from someone else's folder)."""
    def rank(i: int) -> str:
        return hashlib.sha1(f"{seed}:{photo_ids[i]}".encode()).hexdigest()
    return sorted(range(len(photo_ids)), key=rank)


def load_files(spec, files: Sequence[PhotoFile], label: str,
               skipped: tuple[tuple[str, str], ...] = ()) -> DeviceData:
    """Decode a device's files, skip what is unusable, split train/held-out.

    A device needs ``photos_min + heldout_photos`` usable photos; fewer leaves
    it excluded with the reason (the run goes on without it). It trains on at
    most ``photos_max`` photos, which keeps the photo-level delta valid.
    ``skipped`` holds files the source already found unusable (e.g. unlabelled).
    """
    from fl.data.images import UnusablePhoto, read_face  # PIL: only on-disk sources decode

    images, ids, controls, converted = [], [], [], []
    skipped = list(skipped)
    for f in files:
        try:
            image, note = read_face(f.path, spec.image_size, box=f.box, crop=spec.crop)
        except UnusablePhoto as err:
            skipped.append((f.photo_id, str(err)))
            continue
        if note:
            converted.append((f.photo_id, note))
        images.append(image)
        ids.append(f.photo_id)
        controls.append(f.controls)
    if skipped:
        log.warning("%s: skipped %d unusable file(s): %s", label, len(skipped),
                    "; ".join(f"{i} ({why})" for i, why in skipped))
    need = spec.photos_min + spec.heldout_photos
    if len(images) < need:
        return _empty(spec, tuple(skipped), tuple(converted),
                      f"only {len(images)} usable photos; needs data.photos_min + "
                      f"data.heldout_photos = {need}")
    order = stable_order(ids, spec.seed)
    held, train = order[:spec.heldout_photos], order[spec.heldout_photos:][:spec.photos_max]
    stack = np.stack(images)
    labelled = _controls(stack, controls, label)
    return DeviceData(
        train=stack[train], train_ids=tuple(ids[i] for i in train),
        heldout=stack[held], heldout_ids=tuple(ids[i] for i in held),
        train_controls=None if labelled is None else labelled[train],
        heldout_controls=None if labelled is None else labelled[held],
        skipped=tuple(skipped), converted=tuple(converted))


def load_labelled(spec, root: Path, names: Sequence[str],
                  labels: dict[str, tuple[float, ...]] | None, csv_name: str,
                  label: str) -> DeviceData:
    """``load_files`` for photos ``root/<name>`` with controls from a CSV (if any):
    a photo the CSV leaves out is skipped with the reason, never guessed."""
    files, unlabelled = [], []
    for name in names:
        if labels is not None and name not in labels:
            unlabelled.append((name, f"no row in {csv_name}"))
            continue
        files.append(PhotoFile(name, root / name, labels[name] if labels else None))
    return load_files(spec, files, label, tuple(unlabelled))


def _controls(images: np.ndarray, labels: list, label: str) -> np.ndarray | None:
    """Labelled controls, with light direction estimated from the image where unlabelled."""
    if any(c is None for c in labels):
        return None
    estimated = light_from_images(images)  # used where only yaw, pitch, smile are labelled
    rows = [list(c) if len(c) == NUM_CONTROLS else [*c, *estimated[i]]
            for i, c in enumerate(labels)]
    return check_controls(np.asarray(rows, np.float32), label)


def _empty(spec, skipped, converted, reason: str) -> DeviceData:
    s = spec.image_size
    nothing = np.zeros((0, 3, s, s), np.float32)
    return DeviceData(nothing, (), nothing, (), skipped=skipped, converted=converted,
                      excluded=reason)
