"""The portrait task end to end: pretraining logged to MLflow, a federated run
started from its MLflow URI, portrait metrics on SynthFaces and on CelebA."""

from __future__ import annotations

import mlflow
import pytest

from fl.config import compose, objective_key
from fl.data.export import export_celeba
from fl.tracking import keys as K
from fl.tracking.model_init import resolve_init
from server.simulation import simulate

pytestmark = pytest.mark.slow

PORTRAIT_KEYS = [K.PORTRAIT_PSNR, K.PORTRAIT_SSIM, K.PORTRAIT_PSNR_BASELINE_MEAN,
                 K.PORTRAIT_HELDOUT_PSNR, K.NEWUSER_PORTRAIT_PSNR,
                 K.PORTRAIT_ID_ACCURACY, K.PORTRAIT_CONTROL_ERROR,
                 K.PORTRAIT_PSNR_BASELINE_BLUR, K.PORTRAIT_ID_ACCURACY_BASELINE_BLUR,
                 K.PORTRAIT_CONTROL_ERROR_BASELINE_BLUR]


def test_portrait_starts_from_a_pretraining_logged_to_mlflow(tiny_overrides, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides if not o.startswith(("pretrain.cache_dir",
                                                                 "task.eval_clips"))]
    base = [*overrides, "task=portrait", f"tracking.uri={uri}",
            f"pretrain.cache_dir={tmp_path / 'cache'}"]
    artifact = resolve_init(compose(base))
    client = mlflow.MlflowClient(uri)
    pretrain_runs = client.search_runs(
        [client.get_experiment_by_name("fedface-pretrain").experiment_id])
    assert len(pretrain_runs) == 1
    init_uri = f"runs:/{pretrain_runs[0].info.run_id}/pretrain/checkpoint.pt"
    assert "pretrain/loss" in pretrain_runs[0].data.metrics and artifact.endswith(".pt")

    cfg = compose([*base, f"model.init={init_uri}"])
    summary = simulate(cfg)
    run = mlflow.MlflowClient(uri).get_run(summary.run_id)
    assert run.data.tags["fedface.init"] == init_uri
    missing = [k for k in PORTRAIT_KEYS if k not in run.data.metrics]
    assert not missing, missing
    assert 5 < run.data.metrics[K.PORTRAIT_PSNR] < 60 and 0 < run.data.metrics[K.PORTRAIT_SSIM] <= 1
    assert 0 <= run.data.metrics[K.PORTRAIT_ID_ACCURACY] <= 1
    assert 0 <= run.data.metrics[K.PORTRAIT_CONTROL_ERROR] < 2
    assert K.SWAP_PSNR not in run.data.metrics
    assert objective_key(cfg) == K.PORTRAIT_PSNR
    assert summary.final(objective_key(cfg)) == run.data.metrics[K.PORTRAIT_PSNR]

    with pytest.raises(ValueError, match="could not be fetched from MLflow"):
        resolve_init(compose([*base, "model.init=runs:/0123456789abcdef/pretrain/checkpoint.pt"]))


def test_portrait_on_celeba_from_disk(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = export_celeba(tmp_path / "celeba", people=3, photos=9)
    overrides = [o for o in tiny_overrides
                 if not o.startswith(("data.photos", "data.heldout", "task.eval_clips"))]
    cfg = compose([*overrides, "task=portrait", "data=celeba", f"data.root={root}",
                   "data.photos_min=5", "data.photos_max=7", "data.heldout_photos=2",
                   "devices.consent_default=grant",
                   "privacy=photo", f"tracking.uri={uri}"])
    summary = simulate(cfg)
    metrics = mlflow.MlflowClient(uri).get_run(summary.run_id).data.metrics
    assert 5 < metrics[K.PORTRAIT_HELDOUT_PSNR] < 60
    assert K.PORTRAIT_PSNR not in metrics  # no ground-truth render of a real person
    assert K.PORTRAIT_ID_ACCURACY not in metrics
    assert metrics[K.DEVICES_TRAINED] == 3 and metrics[K.DATA_PHOTOS_SKIPPED] == 0
