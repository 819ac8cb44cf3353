"""The portrait model and task: DP-compatible, personal parts split, controls obeyed."""

import numpy as np
import torch
from opacus.validators import ModuleValidator

from fl.data.controls import NUM_CONDITIONS, backdrop, light_from_images
from fl.data.device_data import load_device_data
from fl.data.fleet import FleetSpec
from fl.data.synthfaces import Attributes, Identity, render
from fl.models.portrait import PortraitModel
from fl.pretrain import pretrain
from fl.tasks import get_task
from fl.tasks.portrait import studio_panel

SPEC = FleetSpec(num_devices=2, photos_min=8, photos_max=8, heldout_photos=2, image_size=32,
                 num_public=6)


def test_opacus_validator_passes_with_and_without_adapter():
    for adapter in (False, True):
        assert ModuleValidator.validate(PortraitModel(32, width=8, adapter=adapter),
                                        strict=False) == []


def test_adapter_is_personal_and_starts_as_the_identity():
    task = get_task({"name": "portrait", "width": 8, "adapter": True})
    model = task.build_model(32)
    assert set(task.personal_state(model)) == {"personal.embedding.weight",
                                               "personal.adapter.weight", "personal.adapter.bias"}
    plain = get_task({"name": "portrait", "width": 8}).build_model(32)
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("personal.adapter")})
    conds = torch.rand(3, NUM_CONDITIONS)
    assert torch.allclose(model(conds), plain(conds), atol=1e-6)
    # the adapter does not change the pretraining cache key: one pretraining serves both
    assert task.architecture() == get_task({"name": "portrait", "width": 8}).architecture()


def test_training_tensors_pair_each_photo_with_its_conditions():
    task = get_task({"name": "portrait", "width": 8})
    data = load_device_data(SPEC, 1)
    photos, conds = task.training_tensors(data)
    assert photos.shape == (8, 3, 32, 32) and conds.shape == (8, NUM_CONDITIONS)
    assert torch.allclose(conds[:, :5], torch.from_numpy(data.train_controls))
    assert torch.allclose(conds[:, 5:], torch.from_numpy(backdrop(data.train)))


def test_pretrained_generator_follows_the_requested_controls():
    """After a short pretraining, each drawn portrait is closer to the ground truth
    of the controls it was asked for than to that of the opposite controls."""
    task = get_task({"name": "portrait", "width": 8, "hidden": 16})
    checkpoint = pretrain(task, SPEC, steps=150, batch_size=16, lr=3e-3, seed=0)
    model = task.build_model(32)
    model.load_state_dict({**checkpoint["shared"], **checkpoint["personal_init"]})
    model.eval()
    panel = studio_panel()
    assert len(panel) == 12 and len({(a.yaw, a.smile, a.light_x) for a in panel}) == 12
    left, right = panel[0], panel[-1]  # yaw -0.6 vs 0.6, light -0.5 vs 0.5
    truth = render(Identity.sample(0, 5), [left, right], 32)
    conds = np.concatenate([[[a.yaw, a.pitch, a.smile, a.light_x, a.light_y] for a in (left,
                                                                                    right)],
                            backdrop(truth)], axis=1).astype(np.float32)
    with torch.no_grad():
        drawn = model(torch.from_numpy(conds)).numpy()
    def mse(a, b):
        return float(((a - b) ** 2).mean())

    assert mse(drawn[0], truth[0]) < mse(drawn[0], truth[1])
    assert mse(drawn[1], truth[1]) < mse(drawn[1], truth[0])


def test_light_estimate_tracks_the_renderer():
    attrs = [Attributes.sample(0, i, 0) for i in range(100)]
    images = render([Identity.sample(0, i) for i in range(100)], attrs, 32)
    estimate = light_from_images(images)[:, 0]
    truth = np.array([a.light_x for a in attrs])
    assert np.corrcoef(estimate, truth)[0, 1] > 0.8
