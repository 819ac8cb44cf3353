"""Pretraining on photos on disk (``pretrain.data=folders``): real LFW faces from
scikit-image plus SynthFaces exports, in the per-identity folders layout.

scikit-image's ``lfw_subset()`` holds 100 real LFW faces (25 x 25, grey, tightly
cropped) without names, so each face is written as an identity of its own; the
SynthFaces exports add identities with several photos. A few steps of the
self-supervised objective must lower the loss, for both tasks, through the same
entry as ``experiments.pretrain`` (``resolve_init``), cached by a key that
includes the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from fl.config import ConfigError, compose, task_params, validate
from fl.data.augment import scramble
from fl.data.export import export_folders
from fl.pretrain_data import load_photo_set, photo_source, pretrain_on_photos
from fl.tasks import get_task
from fl.tracking.model_init import resolve_init


@pytest.fixture(scope="module")
def real_folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real-folders")
    for k, face in enumerate(skdata.lfw_subset()[:100]):  # the first 100 are faces
        folder = root / f"LFW_{k:03d}"
        folder.mkdir()
        Image.fromarray((face * 255).round().astype(np.uint8)).save(folder / "face.jpg",
                                                                    quality=95)
    export_folders(root, people=6, photos=8, size=64, controls_csv=False)
    (root / "LFW_000" / "notes.txt").write_text("not a photo")
    return root


def _config(root: Path, tmp_path: Path, task: str, steps: int):
    return compose([f"task={task}", "task.width=8", "pretrain.data=folders",
                    f"pretrain.root={root}", f"pretrain.steps={steps}",
                    "pretrain.batch_size=16", f"pretrain.cache_dir={tmp_path / 'cache'}",
                    f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])


def test_real_faces_load_as_identities_with_files_skipped(real_folders):
    photos = load_photo_set(photo_source(_config(real_folders, Path("/tmp"), "swap",
                                                 1).pretrain), 32, 0)
    assert photos.identities == 106 and len(photos.images) == 100 + 6 * 8
    assert photos.images.dtype == torch.uint8 and photos.images.shape[1:] == (3, 32, 32)
    assert photos.skipped == 1 and not photos.labelled
    assert photos.conditions.shape == (148, 8)


@pytest.mark.parametrize("task_name", ["swap", "portrait"])
def test_the_self_supervised_loss_falls_on_real_faces(real_folders, tmp_path, task_name):
    cfg = _config(real_folders, tmp_path, task_name, 60)
    task = get_task(task_params(cfg))
    photos = load_photo_set(photo_source(cfg.pretrain), 32, 0)
    losses = []
    checkpoint = pretrain_on_photos(task, photos, 60, 16, 2e-3, 0,
                                    lambda step, loss: losses.append(loss))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)
    assert checkpoint["identities"].shape == (106, task.personal_dim)
    model = task.build_model(32)
    model.load_state_dict({**checkpoint["shared"], **checkpoint["personal_init"]})


def test_the_scrambled_frame_keeps_structure_but_not_colour():
    smooth = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    photos = torch.nn.functional.interpolate(smooth, size=32, mode="bilinear")
    photos[:, 0] *= 0.2  # a colour cast the scramble must not keep in place
    out = scramble(photos, torch.Generator().manual_seed(0))
    assert out.shape == photos.shape and out.min() >= 0 and out.max() <= 1
    assert out[:, 0].mean() > 0.2  # the weak channel moved elsewhere in most photos
    grey = photos.mean(1)
    corr = np.corrcoef(grey.flatten(), out.mean(1).flatten())[0, 1]
    assert corr > 0.5  # geometry only slightly warped: the layout still correlates


def test_resolve_init_pretrains_on_folders_and_caches_by_data(real_folders, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(real_folders, tmp_path, "swap", 3)
    validate(cfg)
    path = Path(resolve_init(cfg))
    assert path.is_file() and "swap-folders-" in path.name
    assert resolve_init(cfg) == str(path)  # cached
    (real_folders / "LFW_001" / "second.jpg").write_bytes(
        (real_folders / "LFW_002" / "face.jpg").read_bytes())
    try:
        assert resolve_init(cfg) != str(path)  # the data changed: a new key
    finally:
        (real_folders / "LFW_001" / "second.jpg").unlink()
    synth = compose(["task=swap", "task.width=8", f"pretrain.cache_dir={tmp_path / 'c2'}",
                     "pretrain.steps=1", "pretrain.batch_size=2", "data.num_public=4"])
    assert "folders" not in Path(resolve_init(synth)).name
    with pytest.raises(ConfigError, match="pretrain.data='ffhq' is invalid"):
        validate(compose(["pretrain.data=ffhq"]))
    with pytest.raises(ConfigError, match="pretrain.root=None is invalid"):
        validate(compose(["pretrain.data=celeba"]))
