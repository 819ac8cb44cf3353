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
    load_ledger,
    load_personal,
    save_ledger,
    save_personal,
)
from clients.trainer import TRAINED, train_on_device
from fl import protocol as P
from fl.data import consent
from fl.data.export import export_folders
from fl.data.fleet import FleetSpec
from fl.tasks import get_task

SPEC = FleetSpec(source="device", num_devices=3, photos_min=6, photos_max=10,
                 heldout_photos=2, image_size=32)


def _supernode(data_dir, state_dir) -> Context:
    """What a freshly (re)started SuperNode hands the ClientApp."""
    return Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                   node_config={"partition-id": 2, "data-dir": str(data_dir),
                                "state-dir": str(state_dir)})


def test_state_survives_a_supernode_restart_and_deletion_keeps_the_ledger(tmp_path):
    export = export_folders(tmp_path / "export", people=1, photos=9, controls_csv=False)
    data_dir, state_dir = export / "Person_0000", tmp_path / "state"
    task = get_task({"name": "swap", "width": 8})
    recipe = P.Recipe(local_epochs=1.0, batch_size=4, delta=1e-3, consent_default="grant")

    def one_round(context):
        view = open_device(context, SPEC, recipe, task)
        model = task.build_model(32)
        load_personal(context, model, task, task.personal_state(model))
        ledger = load_ledger(context, "rdp")
        outcome = train_on_device(task, model, task.training_tensors(view.data), recipe, ledger)
        save_personal(context, model, task)
        save_ledger(context, ledger)
        return view, outcome, task.personal_state(model)

    view, outcome, personal = one_round(_supernode(data_dir, state_dir))
    assert outcome.status == TRAINED and len(view.data.train) == 7  # its own folder
    assert {p.name for p in state_dir.iterdir()} == {LEDGER_FILE, PERSONAL_FILE}

    restarted = _supernode(data_dir, state_dir)  # nothing in context.state
    model = task.build_model(32)
    load_personal(restarted, model, task, task.personal_state(task.build_model(32)))
    assert all(torch.equal(task.personal_state(model)[k], v) for k, v in personal.items())
    assert load_ledger(restarted, "rdp").participations == 1
    one_round(restarted)
    assert load_ledger(_supernode(data_dir, state_dir), "rdp").participations == 2

    consent.write_manifest(data_dir, consent.Manifest(delete_my_data=True))
    view = open_device(_supernode(data_dir, state_dir), SPEC, recipe, task)
    assert view.report[P.DELETED] == 1
    assert {p.name for p in state_dir.iterdir()} == {LEDGER_FILE}
    assert load_ledger(_supernode(data_dir, state_dir), "rdp").participations == 2


def test_a_supernode_without_data_dir_says_how_to_start_it(tmp_path):
    task = get_task({"name": "swap", "width": 8})
    context = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0})
    recipe = P.Recipe(consent_default="grant", device_storage=str(tmp_path))
    with pytest.raises(ValueError, match='--node-config "data-dir='):
        open_device(context, SPEC, recipe, task)
