"""A new user enrolls on the device (experiments.enroll), then generates.

A tiny portrait model is pretrained on public identities and logged to a temp
MLflow store the way a federated run logs its model. A held-out identity's
exported SynthFaces JPEGs (never seen in pretraining) are enrolled, with a
picture that has no face and a text file among them, and portraits are drawn
at requested controls through ``experiments.generate --state-dir``. The
portraits must be closer to that identity's exact ground truth than to the mean
face and to other identities'. Then: the ClientApp refuses photo-level DP
training with a personal part fitted without DP, and says why without naming
a file.
"""

from __future__ import annotations

import json
import re
import shutil

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from clients.app import NOT_DP_REFUSAL
from clients.device_state import GENERATION_PREFIX, STAMP_FILE, DeviceStore
from experiments.enroll import main as enroll_main
from experiments.generate import main as generate_main
from fl import protocol as P
from fl.config import compose, fleet_spec, task_params
from fl.data.controls import CONTROL_NAMES
from fl.data.export import EXPORT_ID_OFFSET, export_folders
from fl.data.faces import NoFace, crop_face
from fl.data.fleet import FleetSpec
from fl.data.synthfaces import Attributes, Identity, render
from fl.pretrain import pretrain
from fl.tasks import get_task
from fl.tracking.mlflow_run import RunLogger
from tests.clients.test_app import _metrics, _reason, _recipe, _train

PERSON = 1  # the held-out identity enrolled (exported ids never enter pretraining)
REQUESTS = ["yaw=-0.6,smile=0.1,light_x=-0.5", "yaw=0.0,smile=0.9,light_x=0.5",
            "yaw=0.6,smile=0.1,light_x=0.5", "yaw=0.0,smile=0.5"]


@pytest.fixture(scope="module")
def portrait_run(tmp_path_factory):
    """A tiny pretrained portrait model, logged as a fedface run's model."""
    tmp = tmp_path_factory.mktemp("enroll")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = compose(["task=portrait", "task.width=8", "task.hidden=32", "data.num_public=64",
                   f"tracking.uri={uri}", "tracking.experiment_name=enroll-test"])
    task, spec = get_task(task_params(cfg)), fleet_spec(cfg)
    checkpoint = pretrain(task, spec, steps=250, batch_size=16, lr=2e-3, seed=0)
    import os

    cwd = os.getcwd()
    os.chdir(tmp)  # MLflow's default artifact root is relative
    try:
        run = RunLogger(cfg)
        run.log_shared_model(checkpoint["shared"], checkpoint["personal_init"],
                             task_params(cfg), spec, None)
        run.end()
    finally:
        os.chdir(cwd)
    return cfg, uri, run.run_id, tmp


def _selfies(tmp_path):
    """The held-out identity's photos, a picture without a face, and a text file."""
    export = export_folders(tmp_path / "export", people=PERSON + 1, photos=12, size=128,
                            controls_csv=False)
    folder = tmp_path / "selfies"
    shutil.copytree(export / f"Person_{PERSON:04d}", folder)
    Image.fromarray(skdata.brick()).convert("RGB").save(folder / "wall.jpg", quality=90)
    (folder / "notes.txt").write_text("not a photo")
    return folder


def _truth(person: int, request: str, size: int) -> np.ndarray:
    """An exported identity rendered exactly at a requested portrait."""
    values = {"yaw": 0.0, "pitch": 0.0, "smile": 0.5, "light_x": 0.0, "light_y": -0.3}
    values |= {k: float(v) for k, v in (p.split("=") for p in request.split(","))}
    assert set(values) == set(CONTROL_NAMES)
    attrs = Attributes(**values, light_intensity=1.0, background=(0.55, 0.55, 0.58),
                       background_gradient=0.0, noise_sigma=0.0, noise_seed=0)
    return render(Identity.sample(0, EXPORT_ID_OFFSET + person), [attrs], size)[0]


@pytest.mark.slow
def test_enrolled_selfies_give_portraits_of_that_person(portrait_run, tmp_path, capsys):
    cfg, uri, run_id, _ = portrait_run
    client = mlflow.MlflowClient(uri)
    artifacts_before = [a.path for a in client.list_artifacts(run_id)]
    folder, state = _selfies(tmp_path), tmp_path / "device-state"

    assert enroll_main(["--photos", str(folder), "--model", run_id, "--state-dir", str(state),
                        "--steps", "100", "--lr", "0.1", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "wall.jpg: skipped (no face found)" in out
    assert "notes.txt: skipped (not an image file)" in out
    assert "Fitted without DP" in out

    # written through the device's store, stamped with the model's run, marked no-DP
    (generation,) = sorted(state.glob(f"{GENERATION_PREFIX}*"))
    stamp = json.loads((generation / STAMP_FILE).read_text())
    assert stamp["run"] == run_id and stamp["personal_dp"] is False
    store = DeviceStore(state, run_id)
    assert store.personal_of_run(run_id) is not None and store.fitted_without_dp()
    assert store.ledger()["participations"] == 0 and store.ledger()["steps"] == []
    # nothing went to MLflow
    assert [r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("enroll-test").experiment_id])] == [run_id]
    assert [a.path for a in client.list_artifacts(run_id)] == artifacts_before

    portraits = tmp_path / "portraits"
    args = ["--model", run_id, "--state-dir", str(state), "--out", str(portraits),
            "--tracking-uri", uri]
    for request in REQUESTS:
        args += ["--controls", request]
    assert generate_main(args) == 0
    size = cfg.data.image_size
    drawn = np.stack([np.asarray(Image.open(portraits / f"portrait-{i:03d}-generated.png"),
                                 np.float32).transpose(2, 0, 1) / 255
                      for i in range(len(REQUESTS))])
    truths = {p: np.stack([_truth(p, r, size) for r in REQUESTS]) for p in range(40)}
    mean_face = np.mean(list(truths.values()), axis=0)

    def distance(a, b):
        return float(((a - b) ** 2).mean())

    own = distance(drawn, truths[PERSON])
    assert own < distance(drawn, mean_face)
    others = [distance(drawn, truths[p]) for p in range(8) if p != PERSON]
    assert own < min(others), (own, others)


@pytest.mark.slow
def test_no_face_at_all_is_a_clear_error_and_writes_nothing(portrait_run, tmp_path, capsys):
    _, uri, run_id, _ = portrait_run
    folder, state = tmp_path / "selfies", tmp_path / "device-state"
    folder.mkdir()
    Image.fromarray(skdata.brick()).convert("RGB").save(folder / "wall.jpg")
    Image.fromarray(skdata.coffee()).save(folder / "cup.png")
    assert enroll_main(["--photos", str(folder), "--model", run_id, "--state-dir", str(state),
                        "--tracking-uri", uri]) == 2
    captured = capsys.readouterr()
    assert "wall.jpg: skipped (no face found)" in captured.out
    assert "no face found in any of the 2 files" in captured.err
    assert "nothing was written" in captured.err
    assert not list(state.glob(f"{GENERATION_PREFIX}*")) if state.exists() else True


def test_a_real_face_is_found_and_framed_and_a_texture_is_not(tmp_path):
    """One of the 100 real LFW faces scikit-image ships (25 x 25 grey, tightly
    cropped), set in a larger picture as a selfie would be."""
    face = (skdata.lfw_subset()[0] * 255).astype(np.uint8)
    canvas = np.full((150, 120), 128, np.uint8)
    canvas[30:130, 10:110] = np.asarray(Image.fromarray(face).resize((100, 100)))
    Image.fromarray(canvas).save(tmp_path / "selfie.jpg", quality=95)
    found = crop_face(tmp_path / "selfie.jpg", 32)
    left, top, right, bottom = found.box
    assert 0 <= left < 60 < right <= 120 and 20 <= top < 80 < bottom <= 140
    assert found.image.shape == (3, 32, 32) and found.note == "greyscale to RGB"
    Image.fromarray(skdata.brick()).save(tmp_path / "wall.png")
    with pytest.raises(NoFace, match="no face found"):
        crop_face(tmp_path / "wall.png", 32)


# --- privacy: a personal part fitted without DP never shapes a photo-level DP update ----

def test_a_personal_part_fitted_without_dp_is_refused_under_photo_level_dp(tmp_path):
    """What enrollment writes (a generation stamped ``personal_dp: false``) makes a
    real device refuse photo-level DP training, with a reason that names no file;
    without photo-level DP it trains, and its result stays marked."""
    from flwr.app import Context, RecordDict

    export = export_folders(tmp_path / "export", people=1, photos=9, controls_csv=False)
    state = tmp_path / "state"
    fleet = FleetSpec(
        source="device", num_devices=1, photos_min=6, photos_max=10, heldout_photos=2,
        image_size=32)
    context = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "data-dir": str(export / "Person_0000"),
                                   "state-dir": str(state)})
    task = get_task({"name": "swap", "width": 8})
    personal = {k: torch.full_like(v, 0.3) for k, v in
                task.personal_state(task.build_model(32)).items()}
    DeviceStore(state, "enrolled-model").save(0, personal, {"noise": [], "rate": [],
                                                            "steps": [], "participations": 0},
                                              personal_dp=False)

    refused = _train(context, _recipe(tmp_path, noise="secure", run="run-b"), 1, fleet)
    assert P.ARRAYS not in refused.content and _metrics(refused)[P.TRAINED] == 0
    assert _reason(refused) == NOT_DP_REFUSAL and str(tmp_path) not in _reason(refused)
    assert len(list(state.glob(f"{GENERATION_PREFIX}*"))) == 1  # nothing trained or saved

    trained = _train(context, _recipe(tmp_path, noise="secure", run="run-b", photo_dp=False),
                     1, fleet)
    assert _metrics(trained)[P.TRAINED] == 1
    again = _train(context, _recipe(tmp_path, noise="secure", run="run-c"), 1, fleet)
    assert _reason(again) == NOT_DP_REFUSAL  # built on it without DP: still marked

    # the refit: forget the personal part (the ledger stays), then DP training from
    # the public start is joined
    assert enroll_main(["--state-dir", str(state), "--forget"]) == 0
    assert not list(state.rglob("personal.pt")) and DeviceStore(state, "x").ledger()
    joined = _train(context, _recipe(tmp_path, noise="secure", run="run-c"), 1, fleet)
    assert _metrics(joined)[P.TRAINED] == 1, _reason(joined)

    fresh = tmp_path / "fresh-state"  # a device that only ever trained under DP joins
    context.node_config["state-dir"] = str(fresh)
    for run in ("run-d", "run-e"):
        joined = _train(context, _recipe(tmp_path, noise="secure", run=run), 1, fleet)
        assert _metrics(joined)[P.TRAINED] == 1, _reason(joined)


def test_the_swap_task_enrolls_too(tmp_path, capsys, monkeypatch):
    """The default task: the personal part is fitted by reconstructing the faces."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    cfg = compose(["task=swap", "task.width=8", "data.num_public=8", f"tracking.uri={uri}"])
    task, spec = get_task(task_params(cfg)), fleet_spec(cfg)
    checkpoint = pretrain(task, spec, steps=3, batch_size=4, lr=2e-3, seed=0)
    run = RunLogger(cfg)
    run.log_shared_model(checkpoint["shared"], checkpoint["personal_init"], task_params(cfg),
                         spec, None)
    run.end()
    state = tmp_path / "state"
    assert enroll_main(["--photos", str(_selfies(tmp_path)), "--model", run.run_id,
                        "--state-dir", str(state), "--steps", "5",
                        "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    used = int(re.search(r"enrolled from (\d+) photos", out).group(1))
    assert 8 <= used <= 12 and "wall.jpg: skipped" in out  # Haar misses some renders
    personal = DeviceStore(state, run.run_id).personal_of_run(run.run_id)
    assert set(personal) == set(checkpoint["personal_init"])
    assert any(not torch.equal(personal[k], checkpoint["personal_init"][k]) for k in personal)
