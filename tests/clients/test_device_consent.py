"""On the device: consent filters photos each round; "delete my data" erases
the personal state and decoded photos but keeps the privacy ledger."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import torch
from flwr.app import Context, RecordDict

from clients.device import open_device
from clients.device_state import (
    LEDGER_FILE,
    LOCK_FILE,
    PERSONAL_FILE,
    device_store,
    load_ledger,
    save_state,
)
from clients.trainer import TRAINED, train_on_device
from fl import protocol as P
from fl.data import consent
from fl.data.device_data import is_cached
from fl.data.fleet import FleetSpec
from fl.tasks import get_task

SPEC = FleetSpec(num_devices=2, photos_min=10, photos_max=10, heldout_photos=2, image_size=32)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(),
                   run_config={})


ROUNDS = iter(range(1, 1000))


def _round(context, recipe, task):
    """What the ClientApp does in a training round, on a real Context."""
    view = open_device(context, SPEC, recipe, task)
    if not view.can_train:
        return view, None
    model = task.build_model(SPEC.image_size)
    store, rnd = device_store(context, recipe, 1), next(ROUNDS)
    ledger = load_ledger(store, recipe.accountant)
    outcome = train_on_device(task, model, task.training_tensors(view.data), recipe, ledger)
    save_state(store, rnd, model, task, ledger)
    return view, outcome


def _stored(root, name):
    return sorted(root.rglob(name))


def test_revocation_takes_effect_at_the_next_round(tmp_path):
    task = get_task({"name": "portrait", "width": 8})
    recipe = P.Recipe(local_epochs=1.0, batch_size=4, device_storage=str(tmp_path),
                      delta=1e-3)
    context = _context()
    view, outcome = _round(context, recipe, task)
    assert outcome.status == TRAINED and len(view.data.train) == 10
    assert view.report[P.PHOTOS_WITHDRAWN] == 0 and view.report[P.OPTED_OUT] == 0

    folder = tmp_path / "device-00001"
    manifest = consent.Manifest()
    manifest.grant(view.data.train_ids + view.data.heldout_ids,
                   now=datetime.now(UTC) - timedelta(days=1))
    revoked = set(view.data.train_ids[:4])
    manifest.revoke(revoked)
    consent.write_manifest(folder, manifest)
    view, outcome = _round(context, recipe, task)
    assert outcome.status == TRAINED and view.report[P.PHOTOS_WITHDRAWN] == 4
    assert len(view.data.train) == 6 and not revoked & set(view.data.train_ids)

    manifest.revoke(view.data.train_ids)  # nothing left to train on: the device sits out
    consent.write_manifest(folder, manifest)
    view, outcome = _round(context, recipe, task)
    assert outcome is None and view.report[P.OPTED_OUT] == 1
    assert "no photo is consented" in view.reason
    assert view.can_evaluate  # evaluation consent was not revoked for held-out photos


def test_delete_my_data_erases_personal_state_and_photos_but_keeps_the_ledger(tmp_path):
    task = get_task({"name": "swap", "width": 8})
    recipe = P.Recipe(local_epochs=1.0, batch_size=4, device_storage=str(tmp_path),
                      delta=1e-3)
    context = _context()
    _round(context, recipe, task)
    _round(context, recipe, task)
    folder = tmp_path / "device-00001"
    ledgers_before = [p.read_text() for p in _stored(folder, LEDGER_FILE)]
    assert _stored(folder, PERSONAL_FILE) and is_cached(SPEC, 1)

    consent.write_manifest(folder, consent.Manifest(delete_my_data=True))
    view, outcome = _round(context, recipe, task)

    assert outcome is None and view.data is None
    assert view.report == {P.OPTED_OUT: 1, P.DELETED: 1}
    # nothing of the personal state remains in what the device stores...
    assert not _stored(folder, PERSONAL_FILE)
    assert not is_cached(SPEC, 1)
    assert {p.name for p in folder.rglob("*") if p.is_file()} == {
        consent.MANIFEST, LEDGER_FILE, "stamp.json", LOCK_FILE}
    # ...but the ledger is intact: what was released stays accounted
    assert [p.read_text() for p in _stored(folder, LEDGER_FILE)] == ledgers_before
    assert load_ledger(device_store(context, recipe, 1), "rdp").participations == 2
    assert consent.read_manifest(folder).deleted is not None
    # and it stays out in later rounds
    view, _ = _round(context, replace(recipe, seed=1), task)
    assert view.report[P.DELETED] == 1 and not _stored(folder, PERSONAL_FILE)


def test_personal_weights_tensor_values_do_not_survive_deletion(tmp_path):
    """The erased weights are not hiding in any remaining record."""
    task = get_task({"name": "swap", "width": 8})
    recipe = P.Recipe(local_epochs=1.0, batch_size=4, device_storage=str(tmp_path), delta=1e-3)
    context = _context()
    _round(context, recipe, task)
    personal = device_store(context, recipe, 1).personal(before_round=999)
    consent.write_manifest(tmp_path / "device-00001", consent.Manifest(delete_my_data=True))
    _round(context, recipe, task)
    remaining = [v for path in (tmp_path / "device-00001").rglob("*.pt")
                 for v in torch.load(path, weights_only=True).values()]
    assert personal and not any(torch.equal(v, w) for v in remaining for w in personal.values())


def test_a_broken_manifest_denies_everything_erases_nothing_and_names_no_photo(tmp_path,
                                                                            caplog):
    """``"delete_my_data": "false"`` (a string) once erased the user's state. Now a
    manifest with the wrong types denies every photo, erases nothing, and the
    reason for the server names no photo and no path; the device's log does."""
    task = get_task({"name": "swap", "width": 8})
    recipe = P.Recipe(local_epochs=1.0, batch_size=4, device_storage=str(tmp_path),
                      delta=1e-3)
    context = _context()
    view, _ = _round(context, recipe, task)
    folder = tmp_path / "device-00001"
    photo = view.data.train_ids[0]
    (folder / consent.MANIFEST).write_text(
        f'{{"format": 1, "delete_my_data": "false", "photos": {{"{photo}": '
        '{"purposes": ["federated-training", "marketing"]}}}')
    personal = _stored(folder, PERSONAL_FILE)
    for _ in range(2):  # every round, never a crash
        view, outcome = _round(context, recipe, task)
        assert outcome is None and not view.can_train and not view.can_evaluate
        assert view.report.get(P.DELETED, 0) == 0
        assert "consent manifest unusable" in view.reason
        assert '"delete_my_data" is not true or false' in view.reason
        assert '1 photo entry with a bad "purposes" list' in view.reason
        assert photo not in view.reason and str(tmp_path) not in view.reason
    assert _stored(folder, PERSONAL_FILE) == personal and personal  # nothing erased
    assert photo in caplog.text and consent.MANIFEST in caplog.text
