"""The swap model: DP-compatible, personal part split, frame structure at full resolution."""

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


def test_frame_structure_reaches_the_output_at_full_resolution():
    """An output pixel depends on the frame around it far more than on the frame far
    away: the frame's structure arrives through full-resolution skips, not a code."""
    torch.manual_seed(0)
    model = SwapModel(32, width=8).eval()
    frame = torch.rand(1, 3, 32, 32, requires_grad=True)
    model(frame)[0, :, 5, 5].sum().backward()
    grad = frame.grad[0].abs().sum(dim=0)
    assert grad[2:9, 2:9].mean() > 5 * grad[20:, 20:].mean()


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


def test_default_device_trained_head_exists():
    """The configured parameter-efficient head names real modules of the model."""
    task = get_task({"name": "swap", "width": 8,
                     "device_trains": ["decoder.blocks.3", "decoder.out"]})
    trained = [n for n, _ in task.build_model(32).named_parameters()
               if task.is_device_trained(n)]
    assert any(n.startswith("decoder.blocks.3.") for n in trained)
    assert any(n.startswith("decoder.out.") for n in trained)
