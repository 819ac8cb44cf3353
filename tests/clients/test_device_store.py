"""A real device keeps its state in its own directory: the photo-level ledger and
personal weights survive a SuperNode restart (a new Context), and deletion erases
the weights from disk while the ledger stays."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from clients.device import open_device
from clients.device_state import (
    LEDGER_FILE,
    PERSONAL_FILE,
    DeviceStore,
    device_store,
    load_ledger,
    load_personal,
    save_state,
)
from clients.trainer import TRAINED, train_on_device
from fl import protocol as P
from fl.data import consent
from fl.data.export import export_folders
from fl.data.fleet import FleetSpec
from fl.privacy.ledger import PhotoLedger
from fl.tasks import get_task

SPEC = FleetSpec(source="device", num_devices=3, photos_min=6, photos_max=10,
                 heldout_photos=2, image_size=32)


def _supernode(data_dir, state_dir) -> Context:
    """What a freshly (re)started SuperNode hands the ClientApp."""
    return Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                   node_config={"partition-id": 2, "data-dir": str(data_dir),
                                "state-dir": str(state_dir)})


def _files(folder, name):
    return sorted(folder.rglob(name))


def test_state_survives_a_supernode_restart_and_deletion_keeps_the_ledger(tmp_path):
    export = export_folders(tmp_path / "export", people=1, photos=9, controls_csv=False)
    data_dir, state_dir = export / "Person_0000", tmp_path / "state"
    task = get_task({"name": "swap", "width": 8})
    recipe = P.Recipe(local_epochs=1.0, batch_size=4, delta=1e-3, consent_default="grant",
                      run="run-a")

    def one_round(context, rnd):
        view = open_device(context, SPEC, recipe, task)
        store = device_store(context, recipe, 2)
        model = task.build_model(32)
        load_personal(store, rnd, model, task, task.personal_state(model))
        ledger = load_ledger(store, "rdp")
        outcome = train_on_device(task, model, task.training_tensors(view.data), recipe, ledger)
        save_state(store, rnd, model, task, ledger)
        return view, outcome, task.personal_state(model)

    view, outcome, personal = one_round(_supernode(data_dir, state_dir), 1)
    assert outcome.status == TRAINED and len(view.data.train) == 7  # its own folder
    assert [p.parent for p in _files(state_dir, LEDGER_FILE)] == \
        [p.parent for p in _files(state_dir, PERSONAL_FILE)]

    restarted = device_store(_supernode(data_dir, state_dir), recipe, 2)  # a new Context
    model = task.build_model(32)
    assert load_personal(restarted, 2, model, task, task.personal_state(task.build_model(32)))
    assert all(torch.equal(task.personal_state(model)[k], v) for k, v in personal.items())
    assert load_ledger(restarted, "rdp").participations == 1
    one_round(_supernode(data_dir, state_dir), 2)
    assert load_ledger(restarted, "rdp").participations == 2

    consent.write_manifest(data_dir, consent.Manifest(delete_my_data=True))
    view = open_device(_supernode(data_dir, state_dir), SPEC, recipe, task)
    assert view.report[P.DELETED] == 1
    assert not _files(state_dir, PERSONAL_FILE) and _files(state_dir, LEDGER_FILE)
    assert load_ledger(restarted, "rdp").participations == 2


def _ledger(participations: int) -> dict:
    return PhotoLedger(events=[(1.0, 0.25, 4 * participations)],
                       participations=participations).to_config()


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"personal.embedding.weight": torch.full((1, 4), value)}


def test_a_repeated_round_builds_on_the_weights_before_it_and_the_newest_ledger(tmp_path):
    """A resumed server sends round 3 again: the personal weights start from round
    2's, but the ledger is the newest (the first attempt's update left the device,
    so the redo is a fourth participation, not a third one again)."""
    store = DeviceStore(tmp_path, run="run-a")
    for rnd in (1, 2, 3):
        store.save(rnd, _weights(rnd), _ledger(rnd))
    assert store.newest_round() == 3
    assert torch.equal(store.personal(before_round=3)["personal.embedding.weight"],
                       _weights(2)["personal.embedding.weight"])
    assert store.ledger()["participations"] == 3  # never the ledger before round 3
    store.save(3, _weights(3.5), _ledger(4))  # the redo of round 3
    assert store.ledger()["participations"] == 4 and store.newest_round() == 3
    assert torch.equal(store.personal(before_round=4)["personal.embedding.weight"],
                       _weights(3.5)["personal.embedding.weight"])
    assert torch.equal(store.personal(before_round=3)["personal.embedding.weight"],
                       _weights(2)["personal.embedding.weight"])
    assert len(list(tmp_path.glob("gen-*"))) == 2  # the redo and the round it built on
    with pytest.raises(RuntimeError, match="would be forgotten"):
        store.save(4, _weights(4), _ledger(3))  # a ledger that lost a participation
    # Another run on the same state directory (a real device) continues the ledger
    # and the personal weights; it has no round of its own yet.
    other = DeviceStore(tmp_path, run="run-b")
    assert other.ledger()["participations"] == 4 and other.newest_round() is None
    assert torch.equal(other.personal(before_round=1)["personal.embedding.weight"],
                       _weights(3.5)["personal.embedding.weight"])
    assert DeviceStore(tmp_path / "fresh", run="run-a").ledger() is None


def test_a_supernode_without_data_dir_says_how_to_start_it(tmp_path):
    task = get_task({"name": "swap", "width": 8})
    context = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0})
    recipe = P.Recipe(consent_default="grant", device_storage=str(tmp_path))
    with pytest.raises(ValueError, match='--node-config "data-dir='):
        open_device(context, SPEC, recipe, task)
