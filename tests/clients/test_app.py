"""The ClientApp itself, on real Contexts: what a device refuses, and what its
ledger counts when a round is repeated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, Metadata, RecordDict

from clients.app import app
from clients.device_state import GENERATION_PREFIX, LEDGER_FILE, DeviceStore
from fl import protocol as P
from fl.data import consent
from fl.data.device_data import load_device_data
from fl.data.export import export_folders
from fl.data.fleet import FleetSpec
from fl.privacy.ledger import epsilon_of
from fl.tasks import get_task

TASK = {"name": "swap", "width": 8}
SPEC = FleetSpec(num_devices=2, photos_min=10, photos_max=10, heldout_photos=2, image_size=32)
DEVICE = 1


def _recipe(tmp_path, **changes) -> P.Recipe:
    return P.Recipe(**{"local_epochs": 1.0, "batch_size": 4, "delta": 1e-3, "run": "run-a",
                       "device_storage": str(tmp_path / "devices"), "consent_default": "grant",
                       **changes})


def _simulated() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": DEVICE},
                   state=RecordDict(), run_config={})


def _train(context: Context, recipe: P.Recipe, server_round: int, fleet: FleetSpec = SPEC,
           message_type: str = MessageType.TRAIN):
    """Send the ClientApp a training message as the server does; its reply."""
    task = get_task(TASK)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same starting weights in every message
        model = task.build_model(fleet.image_size)
    config = P.round_config(recipe, TASK, fleet)
    config["server-round"] = server_round
    content = RecordDict({P.ARRAYS: ArrayRecord(task.shared_state(model)),
                          P.PERSONAL_INIT: ArrayRecord(task.personal_state(model)),
                          P.CONFIG: config})
    metadata = Metadata(run_id=1, message_id=f"{message_type}-{server_round}", src_node_id=1,
                        dst_node_id=context.node_id, reply_to_message_id="", group_id="",
                        created_at=datetime.now(UTC).timestamp(), ttl=600.0,
                        message_type=message_type)
    reply = app(Message(content=content, metadata=metadata), context)
    assert not reply.has_error(), reply.error
    return reply


def _evaluate(context: Context, recipe: P.Recipe, server_round: int, fleet: FleetSpec = SPEC):
    """Send the ClientApp the evaluation message of ``server_round``; its reply."""
    return _train(context, recipe, server_round, fleet, MessageType.EVALUATE)


def _metrics(reply: Message) -> dict:
    return dict(reply.content[P.METRICS])


def _reason(reply: Message) -> str:
    return str(reply.content[P.STATUS][P.REASON]) if P.STATUS in reply.content else ""


def _generations(root) -> list:
    return sorted(root.rglob(f"{GENERATION_PREFIX}*"))


# --- seeded noise on a real device ----------------------------------------------------

@pytest.mark.parametrize("owner_keys", [("data-dir", "state-dir"), ("state-dir",)])
def test_a_real_device_refuses_seeded_noise_and_trains_with_secure_noise(tmp_path,
                                                                         owner_keys):
    """A node whose owner gave it a data-dir or a state-dir (which the server cannot
    set) is a real device: it does not train on seeded noise, and says why."""
    export = export_folders(tmp_path / "export", people=1, photos=9, controls_csv=False)
    state_dir = tmp_path / "state"
    owner = {"data-dir": str(export / "Person_0000"), "state-dir": str(state_dir)}
    context = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, **{k: owner[k] for k in owner_keys}})
    fleet = SPEC if "data-dir" not in owner_keys else FleetSpec(
        source="device", num_devices=1, photos_min=6, photos_max=10, heldout_photos=2,
        image_size=32)

    refused = _train(context, _recipe(tmp_path, noise="seeded"), 1, fleet)
    assert P.ARRAYS not in refused.content and _metrics(refused)[P.TRAINED] == 0
    assert "seeded noise" in _reason(refused)
    assert "privacy.noise=secure" in _reason(refused)
    assert not _generations(tmp_path)  # nothing trained, nothing recorded

    trained = _train(context, _recipe(tmp_path, noise="secure"), 1, fleet)
    assert P.ARRAYS in trained.content and _metrics(trained)[P.TRAINED] == 1


@pytest.mark.parametrize("source", ["folders-of-its-own", "device"])
def test_a_real_device_without_a_state_dir_refuses_and_writes_nothing(tmp_path, source):
    """A real device (its own data-dir, or data=device) without a state-dir would
    keep its ledger where the server says, one per run: its spend across runs would
    be lost. It refuses, says how to start it, and creates nothing anywhere."""
    export = export_folders(tmp_path / "export", people=1, photos=9, controls_csv=False)
    config = {"partition-id": 0}
    if source == "folders-of-its-own":
        config["data-dir"] = str(export / "Person_0000")
    context = Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                      node_config=config)
    fleet = FleetSpec(source="device", num_devices=1, photos_min=6, photos_max=10,
                      heldout_photos=2, image_size=32)
    for send in (_train, _evaluate):
        reply = send(context, _recipe(tmp_path, noise="secure"), 1, fleet)
        assert P.ARRAYS not in reply.content
        assert "state-dir" in _reason(reply) and "forgotten between runs" in _reason(reply)
        assert str(tmp_path) not in _reason(reply)
    assert _metrics(_train(context, _recipe(tmp_path, noise="secure"), 1, fleet))[
        P.PARTICIPATIONS] == 0
    assert not (tmp_path / "devices").exists()


def test_a_simulated_device_trains_with_seeded_noise(tmp_path):
    reply = _train(_simulated(), _recipe(tmp_path, noise="seeded"), 1)
    assert P.ARRAYS in reply.content and not _reason(reply)


def test_a_device_says_with_its_update_when_its_budget_admits_no_further_round(tmp_path):
    """A budget between one and two participations' epsilon: the first update comes
    with ``budget-spent`` (the server then stops asking), and a second request is
    refused without training. A budget of three participations says nothing."""
    one = epsilon_of([(1.0, 1 / 3, 3)], 1e-3)
    two = epsilon_of([(1.0, 1 / 3, 3)] * 2, 1e-3)
    first = _metrics(_train(_simulated(), _recipe(tmp_path, budget_epsilon=(one + two) / 2), 1))
    assert (first[P.TRAINED], first[P.STEPS], first[P.BUDGET_SPENT]) == (1, 3, 1)
    again = _metrics(_train(_simulated(), _recipe(tmp_path, budget_epsilon=(one + two) / 2), 2))
    assert again[P.TRAINED] == 0 and again[P.BUDGET_EXHAUSTED] == 1
    roomy = _metrics(_train(_simulated(), _recipe(tmp_path / "b", budget_epsilon=3 * two), 1))
    assert roomy[P.TRAINED] == 1 and P.BUDGET_SPENT not in roomy


# --- a repeated round -------------------------------------------------------------------

def _lose_photos(tmp_path, count: int) -> None:
    """The device's user withdraws ``count`` training photos."""
    data = load_device_data(SPEC, DEVICE)
    manifest = consent.Manifest()
    manifest.grant(data.train_ids + data.heldout_ids, now=datetime.now(UTC) - timedelta(days=1))
    manifest.revoke(data.train_ids[:count])
    consent.write_manifest(tmp_path / "devices" / f"device-{DEVICE:05d}", manifest)


def test_a_device_that_trains_a_round_again_counts_both_runs(tmp_path):
    """Round 1, then two photos are withdrawn, then round 1 again (the server
    resumed): two different updates left the device, and its ledger counts both."""
    context, recipe = _simulated(), _recipe(tmp_path)
    first = _metrics(_train(context, recipe, 1))
    assert first[P.PARTICIPATIONS] == 1 and first[P.PHOTOS_USED] == 10
    _lose_photos(tmp_path, 2)
    again = _metrics(_train(context, recipe, 1))
    assert again[P.TRAINED] == 1 and again[P.PHOTOS_USED] == 8
    assert again[P.PARTICIPATIONS] == 2
    assert again[P.LEDGER_STEPS] == first[P.STEPS] + again[P.STEPS]
    both = [(1.0, first[P.SAMPLE_RATE], first[P.STEPS]),
            (1.0, again[P.SAMPLE_RATE], again[P.STEPS])]
    assert first[P.SAMPLE_RATE] != again[P.SAMPLE_RATE]  # 1/3, then 1/2
    assert again[P.PHOTO_EPS] == pytest.approx(epsilon_of(both, recipe.delta))
    assert again[P.PHOTO_EPS] > first[P.PHOTO_EPS]
    store = DeviceStore(tmp_path / "devices" / f"device-{DEVICE:05d}" / "state" / "run-a",
                        "run-a")
    assert store.ledger()["participations"] == 2 and store.newest_round() == 1


# --- a server that went back --------------------------------------------------------------

def test_a_device_refuses_a_round_older_than_its_state_and_redoes_its_newest(tmp_path):
    """The server resumed from an older checkpoint than the device's state: the
    device does not train round 1 after round 2, and says which round it holds.
    Round 2 again is a legitimate replay of an unreleased round: it trains."""
    context, recipe = _simulated(), _recipe(tmp_path)
    _train(context, recipe, 1)
    assert _metrics(_train(context, recipe, 2))[P.PARTICIPATIONS] == 2
    ledgers = [p.read_text() for p in sorted((tmp_path / "devices").rglob(LEDGER_FILE))]

    refused = _train(context, recipe, 1)
    metrics = _metrics(refused)
    assert P.ARRAYS not in refused.content and metrics[P.TRAINED] == 0
    assert metrics[P.NEWER_STATE_ROUND] == 2
    assert "resumed from a checkpoint older than this device's state" in _reason(refused)
    assert "newest checkpoint" in _reason(refused)
    assert metrics[P.PARTICIPATIONS] == 2  # it reports its ledger, unchanged
    assert [p.read_text() for p in sorted((tmp_path / "devices").rglob(LEDGER_FILE))] \
        == ledgers

    replay = _train(context, recipe, 2)
    assert P.ARRAYS in replay.content and P.NEWER_STATE_ROUND not in _metrics(replay)
    # seeded, photos unchanged: the very update that left before, counted once
    assert _metrics(replay)[P.PARTICIPATIONS] == 2


@pytest.mark.parametrize("noise,counted", [("seeded", 1), ("secure", 2)])
def test_a_repeat_counts_again_unless_the_same_update_leaves_again(tmp_path, noise, counted):
    """A seeded repeat over unchanged photos sends the first attempt's update bit
    for bit: publishing it twice reveals nothing more, so it is counted once (a
    resumed seeded run then spends exactly what an uninterrupted one does). Under
    secure noise the repeat is a fresh release and is counted again."""
    context, recipe = _simulated(), _recipe(tmp_path, noise=noise)
    first = _train(context, recipe, 1)
    again = _train(context, recipe, 1)
    a, b = (r.content[P.ARRAYS].to_torch_state_dict() for r in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a) == (noise == "seeded")
    assert _metrics(again)[P.PARTICIPATIONS] == counted
    assert _metrics(again)[P.LEDGER_STEPS] == counted * _metrics(first)[P.STEPS]


def test_the_seeded_update_of_a_round_is_reproducible_on_the_device(tmp_path):
    """Seeded noise keeps a simulation reproducible: the same round on a fresh copy
    of the device's state gives the same update bit for bit."""
    replies = [_train(_simulated(), _recipe(tmp_path / str(i)), 1) for i in range(2)]
    a, b = (r.content[P.ARRAYS].to_torch_state_dict() for r in replies)
    assert all(torch.equal(a[k], b[k]) for k in a)
