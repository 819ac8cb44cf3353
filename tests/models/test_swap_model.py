import torch
from opacus.validators import ModuleValidator

from fl.models.swap import PERSONAL_PREFIX, SwapModel
from fl.tasks import get_task


def test_opacus_module_validator_passes():
    assert ModuleValidator.validate(SwapModel(32, width=8), strict=False) == []


def test_swap_output_shape_and_range():
    model = SwapModel(64, width=8)
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64) and 0 <= out.min() and out.max() <= 1


def test_personal_part_is_small_and_separate():
    task = get_task({"name": "swap", "width": 8})
    model = task.build_model(32)
    shared, personal = task.shared_state(model), task.personal_state(model)
    assert set(personal) == {f"{PERSONAL_PREFIX}embedding.weight"}
    assert not any(k.startswith(PERSONAL_PREFIX) for k in shared)
    n_personal = sum(v.numel() for v in personal.values())
    n_shared = sum(v.numel() for v in shared.values())
    assert n_personal * 100 < n_shared


def test_task_splits_device_trained_shared_weights():
    task = get_task({"name": "swap", "width": 8, "device_trains": ["decoder"]})
    model = task.build_model(32)
    names = [n for n, _ in model.named_parameters()]
    assert any(task.is_device_trained(n) for n in names)
    assert not any(task.is_device_trained(n) for n in names if n.startswith("encoder."))
    assert not any(task.is_device_trained(n) for n in names if task.is_personal(n))
