"""End to end in real Flower simulations: consent changes mid-run, "delete my
data", and an on-disk dataset with broken files and a device too poor to join."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pytest
import torch

from fl import protocol as P
from fl.config import compose, fleet_spec
from fl.data import consent
from fl.data.device_data import load_device_data
from fl.data.export import export_folders
from fl.tracking import keys as K
from server.simulation import simulate
from tests.data.datasets import BROKEN, CONVERTED, add_broken_files

pytestmark = pytest.mark.slow


class ChangeBeforeRound:
    """A grid that runs ``change()`` just before the training messages of a round
    go out: what a user editing their consent between rounds looks like."""

    def __init__(self, grid, at_round: int, change) -> None:
        self.grid, self.at_round, self.change, self.sampled = grid, at_round, change, {}
        self.replies = []

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            rnd = int(messages[0].content[P.CONFIG]["server-round"])
            self.sampled[rnd] = len(messages)
            if rnd == self.at_round:
                self.change()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def _history(uri: str, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)}


def test_revocation_and_deletion_take_effect_at_the_next_round(tiny_overrides, tmp_path,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "devices"
    overrides = [o for o in tiny_overrides if not o.startswith(("fleet.rounds",
                                                                 "devices.storage_dir"))]
    cfg = compose([*overrides, "fleet.rounds=3", "fleet.sampling=fixed", "privacy=photo",
                   "privacy.photo.delta=1e-3", f"devices.storage_dir={storage}",
                   f"tracking.uri={uri}", "fleet.newuser_identities=0"])
    spec = fleet_spec(cfg)
    photos = [load_device_data(spec, d) for d in range(3)]

    def users_change_their_minds():
        manifest = consent.Manifest()
        manifest.grant(photos[0].train_ids + photos[0].heldout_ids,
                       now=datetime.now(UTC) - timedelta(days=1))
        manifest.revoke(photos[0].train_ids[:4])
        consent.write_manifest(storage / "device-00000", manifest)
        consent.write_manifest(storage / "device-00002", consent.Manifest(delete_my_data=True))

    grids = {}

    def wrap(grid):
        grids["g"] = ChangeBeforeRound(grid, at_round=2, change=users_change_their_minds)
        return grids["g"]

    summary = simulate(cfg, wrap_grid=wrap)
    used = _history(uri, summary.run_id, K.CONSENT_PHOTOS_USED)
    total = sum(len(p.train) for p in photos)
    assert used[1] == total
    assert used[2] == total - 4 - len(photos[2].train)
    assert _history(uri, summary.run_id, K.CONSENT_PHOTOS_REVOKED) == {1: 0, 2: 4, 3: 4}
    assert _history(uri, summary.run_id, K.CONSENT_DEVICES_OPTED_OUT) == {1: 0, 2: 1, 3: 1}
    assert _history(uri, summary.run_id, K.DEVICES_TRAINED) == {1: 3, 2: 2, 3: 2}
    assert grids["g"].sampled == {1: 3, 2: 3, 3: 2}  # the deleted device is not sampled again
    assert consent.read_manifest(storage / "device-00002").deleted is not None
    # the deleted device's ledger row stays, with its participation and reason
    local = mlflow.MlflowClient(uri).download_artifacts(summary.run_id, "privacy/ledger.json")
    table = json.loads(Path(local).read_text())
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert rows["device-00002"]["participations"] == 1
    assert rows["device-00002"]["epsilon"] > 0
    assert "deleted their data" in rows["device-00002"]["status"]
    # devices that sat out said why in one line, naming no photo
    reasons = [str(r.content[P.STATUS][P.REASON]) for r in grids["g"].replies
               if P.STATUS in r.content]
    assert "the user deleted their data" in reasons
    assert all(set(r.content[P.STATUS]) == {P.REASON} for r in grids["g"].replies
               if P.STATUS in r.content)
    assert not any("photo-" in reason for reason in reasons)


def test_folders_dataset_with_broken_files_runs_and_reports_them(tiny_overrides, tmp_path,
                                                                 monkeypatch):
    """An on-disk dataset with unusable files, a device with too few photos, and a
    device whose consent manifest is broken in ways that name its photos: the run
    goes on, and no file name, photo id or person's folder reaches the server's
    records (the whole MLflow run and the whole checkpoint are searched)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = export_folders(tmp_path / "lfw", people=4, photos=8, controls_csv=False)
    add_broken_files(root / "Person_0001", root / "Person_0001" / "Person_0001_0001.jpg")
    for f in sorted((root / "Person_0003").iterdir())[:5]:
        f.write_text("not a photo any more")
    storage = tmp_path / "devices"
    broken = {"format": 1, "delete_my_data": "false", "photos": {  # "false" is not false
        "Person_0002/Person_0002_0001.jpg": {"purposes": ["federated-training", "marketing"]},
        "Person_0002/Person_0002_0002.jpg": {"purposes": ["evaluation"], "granted": "today"}}}

    def break_the_manifest():  # after device 2 trained once: it has personal weights
        (storage / "device-00002" / consent.MANIFEST).write_text(json.dumps(broken))
    overrides = [o for o in tiny_overrides
                 if not o.startswith(("fleet.", "data.photos", "data.heldout",
                                      "devices.storage_dir", "checkpoint.dir"))]
    cfg = compose([*overrides, "data=folders", f"data.root={root}", "data.photos_min=4",
                   "data.photos_max=20", "data.heldout_photos=2", "devices.consent_default=grant",
                   "fleet.num_devices=100", "fleet.devices_per_round=4", "fleet.sampling=fixed",
                   "fleet.rounds=2", "fleet.eval_devices=3", "fleet.newuser_identities=1",
                   "fleet.newuser_steps=3", "privacy=photo", "privacy.photo.delta=1e-3",
                   f"devices.storage_dir={storage}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                   f"tracking.uri={uri}"])
    summary = simulate(cfg, wrap_grid=lambda g: ChangeBeforeRound(g, 2, break_the_manifest))
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary.run_id)
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.params["fleet.num_devices"] == "4"
    assert m[K.DATA_PHOTOS_SKIPPED] == len(BROKEN) + 5
    assert m[K.DATA_PHOTOS_CONVERTED] == len(CONVERTED)
    assert m[K.DATA_DEVICES_EXCLUDED] == 1
    assert _history(uri, summary.run_id, K.DEVICES_TRAINED) == {1: 3, 2: 2}
    assert K.RECON_PSNR in m and K.NEWUSER_SWAP_PSNR in m
    assert K.SWAP_PSNR not in m  # real photos: no ground truth of a swap exists
    # The broken manifest denied training, said why, and erased nothing
    # ("delete_my_data": "false" once erased the user's personal weights).
    rows = _ledger_rows(client, summary.run_id)
    assert '"delete_my_data" is not true or false' in rows["device-00002"]["status"]
    assert ('1 photo entry with a bad "purposes" list; 1 photo entry with a bad "granted" '
            'time') in rows["device-00002"]["status"]
    assert (storage / "device-00002" / consent.MANIFEST).read_text() == json.dumps(broken)
    assert list((storage / "device-00002").rglob("personal.pt"))

    names = {n for f in root.rglob("*") for n in (f.name, f.stem, str(f.relative_to(root)))}
    record = _everything_recorded(client, summary.run_id) + _checkpoints(tmp_path / "ckpt")
    assert set(broken["photos"]) <= names and "Person_0002" in names  # what is searched
    leaked = sorted(n for n in names if n in record)
    assert not leaked, f"photo or person names reached the server's records: {leaked}"


def _ledger_rows(client, run_id: str) -> dict[str, dict]:
    table = json.loads(Path(client.download_artifacts(run_id, "privacy/ledger.json"))
                       .read_text())
    return {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}


def _everything_recorded(client, run_id: str) -> str:
    """Every param, tag and metric name of an MLflow run, and every artifact's
    bytes, as one text to search."""
    run = client.get_run(run_id)
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags),
             json.dumps(sorted(run.data.metrics)), run.info.run_name or ""]
    local = Path(client.download_artifacts(run_id, ""))
    files = [f for f in local.rglob("*") if f.is_file()]
    assert any(f.name == "ledger.json" for f in files) and len(files) > 3
    parts += [f.read_bytes().decode("utf-8", "replace") for f in files]
    parts += [str(f.relative_to(local)) for f in files]
    return "\n".join(parts)


def _checkpoints(folder: Path) -> str:
    """The server's checkpoints, raw and unpickled, as one text to search."""
    found = [f for f in folder.rglob("*") if f.is_file()]
    assert found
    text = []
    for f in found:
        text.append(f.read_bytes().decode("utf-8", "replace"))
        if f.suffix == ".pt":
            text.append(repr(torch.load(f, map_location="cpu", weights_only=False)))
    return "\n".join(text)
