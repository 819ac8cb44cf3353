"""A run through experiments.train's entry function (what a sweeper calls; it
returns the configured objective), then experiments.generate on it: the logged
shared model + one device's personal part + real image files -> output images."""

from __future__ import annotations

import argparse

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from clients.device_state import DeviceStore
from experiments.generate import (
    GenerateError,
    main,
    parse_controls,
    personal_state,
    save_images,
    task_inputs,
)
from experiments.train import main as train_main
from fl.config import compose, fleet_spec, task_params
from fl.data.fleet import FleetSpec
from fl.data.images import read_face
from fl.pretrain import load_checkpoint
from fl.tasks import get_task


@pytest.fixture(scope="module")
def swap_run(tiny_overrides, tmp_path_factory):
    """One run through the researcher's entry point (``experiments.train``'s
    function, as a Hydra sweeper calls it), returning a configured objective."""
    tmp = tmp_path_factory.mktemp("generate")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides if not o.startswith(("fleet.rounds",
                                                                 "devices.storage_dir"))]
    cfg = compose([*overrides, "fleet.rounds=1", f"tracking.uri={uri}",
                   "tracking.samples_every=0", f"devices.storage_dir={tmp / 'devices'}",
                   "objective.metric=quality/recon_psnr"])
    import os
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        objective = train_main.__wrapped__(cfg)
    finally:
        os.chdir(cwd)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fedface").experiment_id])
    return cfg, uri, run.info.run_id, tmp, objective


@pytest.mark.slow
def test_train_returns_the_configured_objective_for_sweepers(swap_run):
    _, uri, run_id, _, objective = swap_run
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.tags["fedface.objective"] == "quality/recon_psnr"
    assert objective == pytest.approx(run.data.metrics["quality/recon_psnr"], rel=1e-12)
    assert objective != pytest.approx(run.data.metrics["quality/swap_psnr"])
    # the face metrics of the attribute net travel with every swap evaluation
    m = run.data.metrics
    assert 0 <= m["quality/swap_id_accuracy"] <= 1 and 0 <= m["quality/swap_pose_error"] < 2
    assert m["quality/swap_id_accuracy_baseline_blur"] <= 1
    assert {"quality/swap_pose_error_baseline_blur", "quality/swap_psnr_baseline_blur"} <= set(m)


def _jpeg(path, seed: int):
    pixels = np.random.default_rng(seed).integers(0, 255, (90, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.mark.slow
def test_generate_puts_the_devices_face_into_real_jpeg_frames(swap_run, tmp_path):
    cfg, uri, run_id, tmp, _ = swap_run
    frames = [str(_jpeg(tmp_path / f"frame{i}.jpg", i)) for i in range(2)]
    out = tmp_path / "out"
    assert main(["--model", run_id, "--device", "1", "--frames", *frames, "--out", str(out),
                 "--tracking-uri", uri]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["frame0-generated.png", "frame1-generated.png"]

    # exactly the shared model with device 1's own personal part, on the decoded JPEGs
    task, spec = get_task(task_params(cfg)), fleet_spec(cfg)
    mlflow.set_tracking_uri(uri)
    shared = load_checkpoint(mlflow.artifacts.download_artifacts(
        f"runs:/{run_id}/model/shared.pt"))
    personal = DeviceStore(tmp / "devices" / "device-00001" / "state" / run_id,
                           run_id).personal(before_round=99)
    model = task.build_model(spec.image_size)
    model.load_state_dict({**shared["shared"], **shared["personal_init"], **personal})
    inputs = torch.from_numpy(np.stack([read_face(f, spec.image_size)[0] for f in frames]))
    with torch.no_grad():
        expected = model.eval()(inputs)[0].permute(1, 2, 0).numpy() * 255
    got = np.asarray(Image.open(out / "frame0-generated.png"), dtype=np.float32)
    assert got.shape == (spec.image_size, spec.image_size, 3)
    assert np.abs(got - expected).max() <= 0.51  # only the rounding to 8 bits
    public = task.build_model(spec.image_size)
    public.load_state_dict({**shared["shared"], **shared["personal_init"]})
    with torch.no_grad():
        assert not torch.allclose(public.eval()(inputs), model(inputs))  # personal part used

    # the registered-model route and a device that never trained in this run
    assert main(["--model", f"runs:/{run_id}/model", "--device", "0", "--clip", "1",
                 "--out", str(tmp_path / "clip"), "--tracking-uri", uri]) == 0
    assert len(list((tmp_path / "clip").iterdir())) == cfg.data.clip_length
    assert main(["--model", run_id, "--device", "0", "--frames", frames[0],
                 "--storage-dir", str(tmp_path / "elsewhere"), "--out", str(out),
                 "--tracking-uri", uri]) == 2


def test_portrait_inputs_from_controls_and_a_real_backdrop_photo(tmp_path):
    spec = FleetSpec(image_size=32)
    photo = _jpeg(tmp_path / "backdrop.jpg", 3)
    args = argparse.Namespace(frames=None, clip=0, backdrop_image=str(photo),
                              controls=["yaw=0.4,smile=0.9", "light_x=-0.5"])
    inputs = task_inputs(args, "portrait", spec)
    assert inputs.tensor.shape == (2, 8)
    assert inputs.tensor[0, :5].tolist() == pytest.approx([0.4, 0.0, 0.9, 0.0, -0.3])
    assert inputs.tensor[1, 3] == pytest.approx(-0.5)
    with pytest.raises(GenerateError, match="unknown control 'grin'"):
        parse_controls("grin=1")
    with pytest.raises(GenerateError, match="a portrait needs --controls"):
        task_inputs(argparse.Namespace(frames=None, clip=0, backdrop_image=None,
                                       controls=None), "portrait", spec)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(GenerateError, match="not an image file"):
        task_inputs(argparse.Namespace(frames=[str(notes)], clip=0, controls=None,
                                       backdrop_image=None), "swap", spec)


def test_frames_that_share_a_stem_get_outputs_of_their_own(tmp_path):
    """``a.jpg`` and ``a.png`` (or two ``a.jpg`` in two folders) once wrote one
    ``a-generated.png``, the second over the first."""
    (tmp_path / "x").mkdir()
    frames = [str(_jpeg(tmp_path / "a.jpg", 1)), str(tmp_path / "a.png"),
              str(_jpeg(tmp_path / "x" / "a.jpg", 2)), str(_jpeg(tmp_path / "b.jpg", 3))]
    Image.open(frames[0]).save(frames[1])
    args = argparse.Namespace(frames=frames, clip=0, controls=None, backdrop_image=None)
    inputs = task_inputs(args, "swap", FleetSpec(image_size=32))
    assert inputs.names == ["a-jpg-1", "a-png", "a-jpg-2", "b"]
    written = save_images(torch.rand(4, 3, 32, 32), inputs.names, tmp_path / "out")
    assert len({p.name for p in written}) == 4 == len(list((tmp_path / "out").iterdir()))


def test_state_dir_gives_the_personal_part_of_the_run_the_model_names(tmp_path):
    """A real device's state directory holds several runs' generations: the
    personal part must be the one trained with ``--model``'s shared weights, not
    the newest of any run."""
    store = DeviceStore(tmp_path, "run-a")
    ledger = {"noise": [], "rate": [], "steps": [], "participations": 0}
    store.save(1, {"personal.embedding.weight": torch.full((1, 4), 1.0)}, ledger)
    DeviceStore(tmp_path, "run-b").save(1, {"personal.embedding.weight": torch.full((1, 4), 2.0)},
                                        ledger)

    def personal(run):
        args = argparse.Namespace(state_dir=str(tmp_path), device=None, storage_dir=None)
        return personal_state(args, None, run)["personal.embedding.weight"][0, 0].item()

    assert personal("run-a") == 1.0 and personal("run-b") == 2.0
    with pytest.raises(GenerateError, match="no personal weights of run run-c, only of "
                                            "run-a, run-b"):
        personal("run-c")
