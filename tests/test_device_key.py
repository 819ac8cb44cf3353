"""The ``device`` key (fl.device), fleet.gpus_per_device and fleet.ray_address.

CI has no GPU: the CUDA tests run where one exists and are skipped otherwise,
with the reason; the CPU path runs through the same code (placement hooks, the
trainer's batch moves and noise generator choice).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clients.trainer import TRAINED, dp_generator, noise_generator, train_on_device
from fl.config import ConfigError, compose, validate
from fl.data.device_data import load_device_data
from fl.data.fleet import FleetSpec
from fl.device import DeviceUnavailable, place, resolve
from fl.privacy.ledger import PhotoLedger
from fl.protocol import Recipe, parse_round_config, round_config
from fl.tasks import get_task
from server.newuser import fit_new_user

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine (torch.cuda."
                                "is_available() is False); the CPU path is tested instead")
SPEC = FleetSpec(num_devices=4, photos_min=12, photos_max=12, heldout_photos=3, image_size=32,
                 num_public=8, clip_length=3)


def test_auto_is_cuda_when_available_and_cpu_names_the_cpu():
    assert resolve("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "", "mps"])
def test_a_name_that_is_no_device_is_refused_with_the_choices(name):
    with pytest.raises(DeviceUnavailable, match="auto | cpu | cuda | cuda:N"):
        resolve(name)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: asking for it is no error here")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_says_so_and_how_to_fix_it(name):
    with pytest.raises(DeviceUnavailable, match="device=cpu or device=auto") as err:
        resolve(name)
    assert f"device={name}" in str(err.value)


def test_the_config_validates_the_hardware_keys():
    validate(compose(["device=cpu", "fleet.ray_address=127.0.0.1:6379"]))
    validate(compose(["fleet.ray_address=ray://10.0.0.2:10001"]))
    with pytest.raises(ConfigError, match="device='banana' is not a device"):
        validate(compose(["device=banana"]))
    if not CUDA:
        with pytest.raises(ConfigError, match="device=cuda but"):
            validate(compose(["device=cuda"]))
    with pytest.raises(ConfigError, match="fleet.gpus_per_device"):
        validate(compose(["fleet.gpus_per_device=-0.5"]))
    with pytest.raises(ConfigError, match="fleet.gpus_per_device"):
        validate(compose(["device=cpu", "fleet.gpus_per_device=0.5"]))
    with pytest.raises(ConfigError, match="fleet.ray_address"):
        validate(compose(["fleet.ray_address=my-cluster"]))
    validate(compose(["fleet.backend=pool"]))
    with pytest.raises(ConfigError, match="fleet.backend='spark' is invalid: one of"):
        validate(compose(["fleet.backend=spark"]))
    with pytest.raises(ConfigError, match="a pool is one machine"):
        validate(compose(["fleet.backend=pool", "fleet.ray_address=auto"]))


def test_the_device_travels_in_the_recipe():
    recipe = Recipe(device="cuda:1")
    parsed, _, _ = parse_round_config(round_config(recipe, {"name": "swap"}, SPEC))
    assert parsed.device == "cuda:1"


def _placed_pair(device: torch.device):
    """The same small model twice: one left alone, one placed on ``device``."""
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 1))

    torch.manual_seed(0)
    model, placed = build(), build()
    placed.load_state_dict(model.state_dict())
    place(device, placed)
    return model, placed


def _check_placement(device: torch.device) -> None:
    """A CPU caller uses a placed model unchanged: outputs and gradients come back
    to the CPU, the weights stay on the device and get their gradients there."""
    model, placed = _placed_pair(device)
    x = torch.rand(2, 3, 8, 8)
    out = placed(x)
    assert out.device.type == "cpu"
    assert torch.allclose(out, model(x), atol=1e-5)
    out.square().mean().backward()
    model(x).square().mean().backward()
    weight = placed[0].weight
    assert weight.device.type == device.type and weight.grad.device.type == device.type
    assert torch.allclose(weight.grad.cpu(), model[0].weight.grad, atol=1e-5)


def test_placement_keeps_cpu_callers_working_on_the_cpu():
    _check_placement(torch.device("cpu"))


def test_the_new_user_check_fits_through_the_placement():
    task = get_task({"name": "swap", "width": 8, "eval_clips": 1})
    model = task.build_model(32)
    shared, personal = task.shared_state(model), task.personal_state(model)
    fitted, data = fit_new_user(task, shared, personal, SPEC, 0, steps=3, device="cpu")
    moved = task.personal_state(fitted)
    assert any(not torch.equal(moved[k], personal[k]) for k in personal)
    assert fitted(torch.from_numpy(data.heldout)).device.type == "cpu"


def test_on_the_cpu_the_noise_and_the_poisson_masks_share_one_generator():
    recipe = Recipe()
    sampler = dp_generator(recipe)
    assert noise_generator(recipe, sampler, torch.device("cpu")) is sampler


# --- where a GPU exists ------------------------------------------------------------

@needs_cuda
def test_placement_on_cuda():
    _check_placement(torch.device("cuda"))


@needs_cuda
@pytest.mark.parametrize("mode", ["seeded", "secure"])
def test_dp_sgd_on_cuda_draws_noise_there_and_accounts_as_on_the_cpu(mode):
    task = get_task({"name": "swap", "width": 8})
    photos = (torch.from_numpy(load_device_data(SPEC, 1).train),)
    recipe = Recipe(local_epochs=1.0, batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0,
                    delta=1e-3, noise=mode)
    sampler = dp_generator(recipe)
    generator = noise_generator(recipe, sampler, torch.device("cuda"))
    assert generator.device.type == "cuda" and generator is not sampler
    outcomes = {}
    for device in ("cpu", "cuda"):
        model = task.build_model(32).to(device)
        ledger = PhotoLedger()
        outcomes[device] = train_on_device(task, model, photos, recipe, ledger)
        assert outcomes[device].status == TRAINED
        assert all(p.device.type == device for p in model.parameters())
    cpu, cuda = outcomes["cpu"], outcomes["cuda"]
    assert (cpu.steps, cpu.sample_rate, cpu.epsilon) == (cuda.steps, cuda.sample_rate,
                                                         cuda.epsilon)


@needs_cuda
def test_generate_style_inference_on_cuda_matches_the_cpu():
    task = get_task({"name": "swap", "width": 8, "eval_clips": 1})
    model = task.build_model(32)
    data = load_device_data(SPEC, 1)
    expected = task.evaluate_device(model, data, SPEC)
    gpu = task.build_model(32)
    gpu.load_state_dict(model.state_dict())
    place(torch.device("cuda"), gpu)
    got = task.evaluate_device(gpu, data, SPEC)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-3), key



def test_a_placed_model_moved_back_to_the_cpu_takes_cpu_inputs_again():
    model, placed = _placed_pair(torch.device("cuda" if CUDA else "cpu"))
    placed.cpu()
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(placed(x), model(x), atol=1e-5)
