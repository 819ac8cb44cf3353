"""CelebA and per-identity folders from disk: layouts, controls, and bad files."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from fl.data import celeba, folders
from fl.data.device_data import available_devices, load_device_data
from fl.data.export import export_celeba, export_folders
from fl.data.fleet import FleetSpec
from tests.data.datasets import BROKEN, CONVERTED, add_broken_files

SPEC = FleetSpec(num_devices=3, photos_min=4, photos_max=6, heldout_photos=2, image_size=32)


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    return export_celeba(tmp_path_factory.mktemp("celeba"), people=3, photos=9)


@pytest.fixture()
def folders_root(tmp_path):
    return export_folders(tmp_path / "lfw", people=3, photos=8, fmt="jpg")


def test_celeba_layout_gives_one_device_per_celebrity_with_controls(celeba_root):
    spec = replace(SPEC, source="celeba", root=str(celeba_root))
    assert available_devices(spec) == 3
    data = load_device_data(spec, 1)
    assert data.train.shape == (6, 3, 32, 32) and data.heldout.shape == (2, 3, 32, 32)
    assert set(data.train_ids) | set(data.heldout_ids) <= set(celeba.identities(str(celeba_root))[2])
    assert data.identity is None and data.skipped == ()
    # smile is CelebA's Smiling attribute, exactly
    _, attrs = celeba._table(str(celeba_root / celeba.ATTRIBUTES))
    smiling = [attrs[name][1] > 0 for name in data.train_ids]
    assert data.train_controls[:, 2].tolist() == [1.0 if s else 0.0 for s in smiling]
    assert np.all(np.abs(data.train_controls[:, [0, 1, 3, 4]]) <= 1)
    # the crop follows the landmarks: the face, not the CelebA canvas, fills the frame
    assert data.train[:, :, 8:24, 8:24].std() > 0.05


def test_celeba_needs_min_photos_and_says_what_is_missing(celeba_root, tmp_path):
    assert available_devices(replace(SPEC, source="celeba", root=str(celeba_root),
                                     photos_min=8, photos_max=8)) == 0
    with pytest.raises(FileNotFoundError, match="identity_CelebA.txt"):
        available_devices(replace(SPEC, source="celeba", root=str(tmp_path)))


def test_folders_read_controls_csv_and_split_stably(folders_root):
    spec = replace(SPEC, source="folders", root=str(folders_root),
                   controls_csv=str(folders_root / "controls.csv"))
    assert available_devices(spec) == 3
    data = load_device_data(spec, 2)
    assert all(i.startswith("Person_0002/") for i in (*data.train_ids, *data.heldout_ids))
    rows = folders.read_controls(str(folders_root / "controls.csv"))
    assert np.allclose(data.train_controls, [rows[i] for i in data.train_ids], atol=1e-6)
    # without the CSV the folders still serve the swap task, with no controls
    unlabelled = load_device_data(replace(spec, controls_csv=""), 2)
    assert unlabelled.train_controls is None
    assert unlabelled.heldout_ids == data.heldout_ids  # the split does not depend on labels


def test_bad_files_are_skipped_or_converted_counted_and_reported(folders_root, caplog):
    person = folders_root / "Person_0001"
    add_broken_files(person, person / "Person_0001_0001.jpg")
    spec = replace(SPEC, source="folders", root=str(folders_root), photos_max=20)
    with caplog.at_level(logging.WARNING, logger="fedface.data"):
        data = load_device_data(spec, 1)
    skipped = {i.split("/")[1]: why for i, why in data.skipped}
    assert set(skipped) == set(BROKEN)
    assert "truncated" in skipped["truncated.jpg"] and "not an image" in skipped["notes.txt"]
    assert "too small" in skipped["tiny.png"]
    assert {i.split("/")[1] for i, _ in data.converted} == set(CONVERTED)
    assert len(data.train) + len(data.heldout) == 8 + len(CONVERTED)
    assert np.isfinite(data.train).all() and data.train.min() >= 0 and data.train.max() <= 1
    # converted greyscale photos (8 and 16 bit) are grey in RGB
    ids, images = data.train_ids + data.heldout_ids, np.concatenate([data.train, data.heldout])
    for name in ("grey.png", "grey16.png"):
        grey = images[ids.index(f"Person_0001/{name}")]
        assert np.allclose(grey[0], grey[1], atol=0.02) and grey.std() > 0.05
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 4 unusable" in warning and "notes.txt" in warning


def test_device_left_with_too_few_usable_photos_is_excluded_with_reason(folders_root):
    person = folders_root / "Person_0000"
    for f in sorted(person.iterdir())[:5]:
        f.write_bytes(b"\xff\xd8\xff broken")
    data = load_device_data(replace(SPEC, source="folders", root=str(folders_root)), 0)
    assert len(data.skipped) == 5 and len(data.train) == 0
    assert "only 3 usable photos" in data.excluded and "6" in data.excluded


def test_controls_csv_errors_name_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "controls.csv"
    bad.write_text("file,yaw\nA/a.jpg,0.1\n")
    with pytest.raises(ValueError, match="lacks columns.*pitch"):
        folders.read_controls(str(bad))
    bad.write_text("file,yaw,pitch,smile\nA/a.jpg,0.1,up,0\n")
    with pytest.raises(ValueError, match=r"controls.csv:2: controls must be numbers"):
        folders.read_controls(str(bad))
