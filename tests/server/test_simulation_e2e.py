"""End to end: a real Flower simulation, real Opacus, a real MLflow store.

Three devices with both privacy units on. Poisson sampling at rate k/N = 1 makes
every device train every round; the user-level budget admits two rounds of the
three planned, so the server must stop cleanly after round 2, every device has
trained twice, and its reported epsilon must cover both participations.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from PIL import Image

from fl import protocol as P
from fl.config import compose, fleet_spec, task_params
from fl.data.fleet import device_photo_count
from fl.pretrain import load_checkpoint
from fl.privacy.ledger import epsilon_of
from fl.privacy.plan import privacy_plan
from fl.tasks import get_task
from fl.tracking import keys as K
from server.simulation import simulate

pytestmark = pytest.mark.slow

DOCUMENTED_KEYS = [
    K.TRAIN_LOSS, K.SWAP_PSNR, K.SWAP_SSIM, K.SWAP_PSNR_BASELINE_CLIP,
    K.SWAP_PSNR_BASELINE_MEAN, K.RECON_PSNR, K.NEWUSER_SWAP_PSNR, K.PHOTO_EPS_MAX,
    K.PHOTO_EPS_MEAN, K.PHOTO_EPS_P95, K.PHOTO_DELTA, K.DEVICES_TRAINED, K.DEVICES_FAILED,
    K.USER_EPS, K.USER_DELTA, K.USER_NOISE_MULTIPLIER, K.UPDATE_CLIP_FRACTION,
    K.DEVICES_BUDGET_EXHAUSTED,
]


class RecordingGrid:
    """Passes everything through to Flower's grid and keeps every reply."""

    def __init__(self, grid) -> None:
        self.grid, self.replies = grid, []

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def _user_budget_admitting_two_rounds(overrides: list[str]) -> float:
    mechanism = privacy_plan(compose(overrides)).user.mechanism
    return (mechanism.epsilon(2) + mechanism.epsilon(3)) / 2


@pytest.fixture(scope="module")
def finished_run(tiny_overrides, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides if not o.startswith("fleet.rounds")]
    overrides += ["fleet.rounds=3", "privacy=photo_user", "fleet.sampling=poisson",
                  "privacy.photo.delta=1e-3", f"tracking.uri={uri}",
                  "tracking.samples_every=2", "tracking.register_model=fedface-e2e",
                  f"tracking.samples_copy={tmp / 'readme' / 'grid.png'}"]
    budget = _user_budget_admitting_two_rounds(overrides)
    cfg = compose(overrides + [f"privacy.user.budget_epsilon={budget}"])
    recorder = {}

    def wrap(grid):
        recorder["grid"] = RecordingGrid(grid)
        return recorder["grid"]

    import os
    cwd = os.getcwd()
    os.chdir(tmp)  # artifacts of a sqlite store land relative to the cwd
    try:
        summary = simulate(cfg, wrap_grid=wrap)
    finally:
        os.chdir(cwd)
    return cfg, uri, summary, recorder["grid"].replies


def test_mlflow_holds_documented_keys_with_sane_values(finished_run):
    _cfg, uri, summary, _ = finished_run
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    missing = [k for k in DOCUMENTED_KEYS if k not in metrics]
    assert not missing, f"documented keys missing from MLflow: {missing}"
    assert metrics[K.DEVICES_TRAINED] == 3 and metrics[K.DEVICES_FAILED] == 0
    for key in (K.SWAP_PSNR, K.SWAP_PSNR_BASELINE_CLIP, K.SWAP_PSNR_BASELINE_MEAN,
                K.RECON_PSNR, K.NEWUSER_SWAP_PSNR):
        assert 5.0 < metrics[key] < 60.0, key
    assert 0.0 < metrics[K.SWAP_SSIM] <= 1.0
    assert metrics[K.PHOTO_DELTA] == pytest.approx(1e-3)
    # one value per round (0 = pretrained, before fine-tuning) for quality metrics
    steps = [m.step for m in client.get_metric_history(summary.run_id, K.SWAP_PSNR)]
    assert steps == [0, 1, 2]
    assert run.data.params["fleet.num_devices"] == "3"
    assert run.data.params["privacy.plan.user_sampling"] == "poisson"


def test_server_stops_before_passing_the_user_budget(finished_run):
    cfg, uri, summary, _ = finished_run
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary.run_id)
    assert "past the budget" in run.data.tags["fedface.stopped"]
    history = client.get_metric_history(summary.run_id, K.USER_EPS)
    assert [m.step for m in history] == [1, 2]
    mechanism = privacy_plan(cfg).user.mechanism
    assert history[-1].value == pytest.approx(mechanism.epsilon(2), rel=1e-9)
    assert history[-1].value <= cfg.privacy.user.budget_epsilon < mechanism.epsilon(3)
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"config", "model", "privacy"} <= artifacts


def test_privacy_review_artifacts(finished_run):
    _cfg, uri, summary, _ = finished_run
    client = mlflow.MlflowClient(uri)
    files = {a.path for a in client.list_artifacts(summary.run_id, "privacy")}
    assert files == {"privacy/ledger.json", "privacy/report.md", "privacy/report.json",
                     "privacy/epsilon.png"}
    local = client.download_artifacts(summary.run_id, "privacy")
    import json
    from pathlib import Path

    ledger = json.loads((Path(local) / "ledger.json").read_text())
    rows = [dict(zip(ledger["columns"], row)) for row in ledger["data"]]
    assert [r["device"] for r in rows] == ["device-00000", "device-00001", "device-00002"]
    assert all(r["participations"] == 2 and r["status"] == "trained" for r in rows)
    eps_max = client.get_run(summary.run_id).data.metrics[K.PHOTO_EPS_MAX]
    assert max(r["epsilon"] for r in rows) == pytest.approx(eps_max)
    data = json.loads((Path(local) / "report.json").read_text())
    assert data["units"]["photo"].startswith("holds") and data["units"]["user"].startswith("holds")
    assert data["user_level"]["neighbouring_relation"] == "add/remove one user"
    assert "past the budget" in data["stopped_early"]
    markdown = (Path(local) / "report.md").read_text()
    assert "secure aggregation" in markdown and "not covered by DP" in markdown


def test_model_samples_system_figure_and_checkpoint_are_in_mlflow(finished_run):
    cfg, uri, summary, _ = finished_run
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary.run_id)
    # stopped by the user budget after round 2: samples at 0, every 2, and the end
    assert {a.path for a in client.list_artifacts(summary.run_id, "samples")} == {
        "samples/round_0000.png", "samples/round_0002.png"}
    # tracking.samples_copy keeps the last grid on disk (the README's picture)
    last = client.download_artifacts(summary.run_id, "samples/round_0002.png")
    copy = Path(cfg.tracking.samples_copy)
    assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(last)))
    assert not list(copy.parent.glob(".*.tmp"))
    assert {a.path for a in client.list_artifacts(summary.run_id, "system")} == {
        "system/rounds.png"}
    assert {a.path for a in client.list_artifacts(summary.run_id, "checkpoint")} == {
        "checkpoint/last.pt"}
    rates = client.get_metric_history(summary.run_id, K.UPDATES_PER_SECOND)
    assert [m.step for m in rates] == [1, 2] and all(m.value > 0 for m in rates)

    # the shared model: registered, loadable as pyfunc, same output as the checkpoint
    assert run.data.tags["fedface.model_uri"] == "models:/fedface-e2e/1"
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/fedface-e2e/1")
    assert list(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == \
        [-1, 3, cfg.data.image_size, cfg.data.image_size]
    task, spec = get_task(task_params(cfg)), fleet_spec(cfg)
    frames = task.model_input(None, spec, rows=3)
    checkpoint = load_checkpoint(client.download_artifacts(summary.run_id, "model/shared.pt"))
    reference = task.build_model(spec.image_size)
    reference.load_state_dict({**checkpoint["shared"], **checkpoint["personal_init"]})
    with torch.no_grad():
        expected = reference.eval()(frames).numpy()
    assert np.allclose(model.predict(frames.numpy()), expected, atol=1e-6)


def test_generate_takes_the_registered_model(finished_run, tmp_path):
    from experiments.generate import main as generate

    cfg, uri, _, _ = finished_run
    # the devices' storage comes from the run's saved configuration
    assert generate(["--model", "models:/fedface-e2e/1", "--device", "2", "--clip", "1",
                     "--out", str(tmp_path), "--tracking-uri", uri]) == 0
    assert len(list(tmp_path.glob("clip-frame-*-generated.png"))) == cfg.data.clip_length


def test_device_epsilon_covers_both_participations(finished_run):
    cfg, uri, summary, _ = finished_run
    spec = fleet_spec(cfg)
    recipe = privacy_plan(cfg).photo
    expected = []
    for device in range(spec.num_devices):
        n = device_photo_count(spec, device)
        batches = math.ceil(n / cfg.local.batch_size)
        steps = max(1, round(cfg.local.personal_epochs * batches)) \
            + max(1, round(cfg.local.epochs * batches))  # personal phase, then shared
        expected.append(epsilon_of([(recipe.noise_multiplier, 1 / batches, 2 * steps)],
                                   recipe.delta))
    client = mlflow.MlflowClient(uri)
    history = {m.step: m.value for m in client.get_metric_history(summary.run_id,
                                                                   K.PHOTO_EPS_MAX)}
    assert history[2] == pytest.approx(max(expected), rel=1e-9)
    assert history[2] > history[1] > 0
    mean = client.get_run(summary.run_id).data.metrics[K.PHOTO_EPS_MEAN]
    assert mean == pytest.approx(np.mean(expected), rel=1e-9)


def test_nothing_personal_or_image_shaped_leaves_a_device(finished_run):
    cfg, _, _, replies = finished_run
    size = cfg.data.image_size
    task = get_task(task_params(cfg))
    shared_keys = set(task.shared_state(task.build_model(size)))
    assert replies, "no replies were recorded"
    for reply in replies:
        assert not reply.has_error(), reply.error
        for name, record in reply.content.items():
            # (P.STATUS, a one-line reason, only comes from devices that sit out; none here)
            assert name in (P.ARRAYS, P.METRICS), f"unexpected record {name!r} in a reply"
            if isinstance(record, ArrayRecord):
                # exactly the model's shared weights: no personal part, nothing extra
                assert set(record) == shared_keys, set(record) ^ shared_keys
                for key, array in record.items():
                    shape = tuple(array.shape)
                    image_like = len(shape) >= 3 and shape[-2:] == (size, size)
                    assert not image_like, f"image-shaped tensor {key} {shape} left a device"
            else:
                assert isinstance(record, MetricRecord) and not isinstance(record, ConfigRecord)
                for key, value in record.items():
                    assert isinstance(value, (int, float)), f"non-scalar metric {key}"
