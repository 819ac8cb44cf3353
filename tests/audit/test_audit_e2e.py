"""End to end: ``experiments.audit``'s path on a real Flower simulation with a bug
planted (DP-SGD's noise off while every ledger records sigma = 20): the audit must
flag it in MLflow, with its keys, report and inversion grid.

Kept as small as still meaningful (``make test`` time): 4 devices in one round,
1 inverted (5 steps: the grid and keys, not the attack's quality, which
test_inversion.py checks), 3 holding 7 canary photos each, no canary users (the
user path has its own fast tests). 21 canaries all guessed right certify 0.98 at
delta 1e-5; the theory at sigma 20 is about 0.18, so the bug is flagged even
with a few wrong guesses. Measured: 20 of 20 guesses right, bound 1.09 against
theory 0.18 (seeded run, secret coins: the guess count can vary, the margin is 6x)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from clients.audit import NOISE_OFF
from fl.config import compose
from fl.tracking import keys as K
from fl.tracking.model_init import resolve_init
from server.audit import log_audit, run_audit

pytestmark = pytest.mark.slow


def test_a_planted_bug_is_flagged_in_mlflow(tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    keep = ("fleet.", "local.batch_size", "local.personal_epochs", "privacy.photo.delta",
            "fleet.rounds")
    cfg = compose([o for o in tiny_overrides if not o.startswith(keep)] + [
        "fleet.num_devices=4", "fleet.devices_per_round=4", "fleet.rounds=1",
        "fleet.eval_devices=1", "fleet.newuser_identities=1", "fleet.newuser_steps=3",
        "fleet.newuser_every=0", "local.batch_size=8", "local.personal_epochs=0", "privacy=photo",
        "privacy.photo.noise_multiplier=20.0", "privacy.photo.delta=1e-3",
        f"tracking.uri={uri}", "tracking.samples_every=0",
        "tracking.audit_canaries_per_device=7", "tracking.audit_user_canaries=0",
        "tracking.audit_inversion_devices=1", "tracking.audit_inversion_steps=5"])
    OmegaConf.set_struct(cfg, False)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # artifacts of a sqlite store land relative to the cwd
    try:
        cfg.model.init = resolve_init(cfg)
        result = run_audit(cfg, planted_bug=NOISE_OFF)
        log_audit(cfg, result)
    finally:
        os.chdir(cwd)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(result.run_id)
    m = run.data.metrics
    assert run.data.tags["fedface.role"] == "audit"
    assert m[K.AUDIT_CANARIES] == 3 * 7  # 4 devices: 1 inversion, 3 photo
    assert m[K.AUDIT_PHOTO_EPS_LOWER] > m[K.AUDIT_PHOTO_EPS_THEORY]
    assert m[K.AUDIT_VIOLATION] == 1.0
    assert m[K.AUDIT_USER_EPS_THEORY] > 1e300  # user-level DP is off: inf (MLflow keeps 1.8e308)
    assert math.isfinite(m[K.AUDIT_INVERSION_PSNR]) and math.isfinite(m[K.AUDIT_MEAN_FACE_PSNR])
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "audit")}
    assert artifacts == {"audit/report.md", "audit/report.json", "audit/inversion.png"}
    path = client.download_artifacts(result.run_id, "audit/report.json", str(tmp_path))
    report = json.loads(Path(path).read_text())
    assert report["violation"] is True and report["photo.epsilon_theory"] < 0.3
