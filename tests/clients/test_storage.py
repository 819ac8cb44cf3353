"""A device's storage loses nothing: one process at a time on a state directory
(two real processes try), durable writes and a full disk, left-overs of a crash,
and unreadable generations (personal weights fall back and say so; the ledger
never does)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time

import pytest
import torch
from flwr.app import Context, RecordDict

from clients import device_state as S
from clients.device_state import DeviceStore
from fl import atomic
from fl import protocol as P
from fl.privacy.ledger import PhotoLedger
from tests.clients.test_app import _evaluate, _metrics, _reason, _recipe, _train

STATE = "state"


def _real_device(tmp_path) -> Context:
    """A SuperNode with its own state directory (photos: SynthFaces device 1)."""
    return Context(run_id=1, node_id=5, state=RecordDict(), run_config={},
                   node_config={"partition-id": 1, "state-dir": str(tmp_path / STATE)})


def _secure(tmp_path, run: str = "run-a") -> P.Recipe:
    return _recipe(tmp_path, noise="secure", run=run)


def _on_disk(tmp_path) -> dict:
    return DeviceStore(tmp_path / STATE, "any").ledger()


# --- two processes, one state directory ------------------------------------------------

def _trainings(tmp_path, run: str, rounds: int) -> list[tuple[int, int, str]]:
    """One SuperNode process's ``rounds`` rounds of its own run, each sent again
    while the device refuses it: (trained, steps, reason) of every reply."""
    context, replies = _real_device(tmp_path), []
    for rnd in range(1, rounds + 1):
        for _ in range(200):
            reply = _train(context, _secure(tmp_path, run), rnd)
            m = _metrics(reply)
            replies.append((m[P.TRAINED], m[P.STEPS], _reason(reply)))
            if m[P.TRAINED]:
                break
            time.sleep(0.02)
    return replies


def _other_supernode(tmp_path, run: str, rounds: int, ready, results) -> None:
    ready.set()
    results.put(_trainings(tmp_path, run, rounds))


def test_two_processes_on_one_state_directory_never_lose_a_step(tmp_path):
    """Two SuperNode processes (two runs) train the same device's state at once.
    Unlocked, both read ledger n and both saved n + 1: 50 DP steps ran and the
    ledger said 30. Now every call holds the directory: a call that finds it
    held refuses and says why, and the ledger holds every step that ran."""
    spawn = multiprocessing.get_context("spawn")
    ready, results = spawn.Event(), spawn.Queue()
    other = spawn.Process(target=_other_supernode, args=(tmp_path, "run-b", 3, ready, results))
    other.start()
    assert ready.wait(120)
    replies = _trainings(tmp_path, "run-a", 3) + results.get(timeout=300)
    other.join(60)
    assert other.exitcode == 0
    done = [steps for trained, steps, _ in replies if trained]
    ledger = _on_disk(tmp_path)
    assert ledger["participations"] == len(done) == 6
    assert sum(ledger["steps"]) == sum(done)  # no step that ran is forgotten
    assert all(reason == S.BUSY for trained, _, reason in replies if not trained)


def _hold(root, held, release) -> None:
    with DeviceStore(root, "a stale SuperNode").lock():
        held.set()
        release.wait(120)


def test_a_second_process_gets_a_clear_refusal_while_the_first_holds_the_directory(
        tmp_path, caplog):
    context = _real_device(tmp_path)
    _train(context, _secure(tmp_path), 1)
    spawn = multiprocessing.get_context("spawn")
    held, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=_hold, args=(tmp_path / STATE, held, release))
    holder.start()
    try:
        assert held.wait(120)
        for send in (_train, _evaluate):
            refused = send(context, _secure(tmp_path), 2)
            assert P.ARRAYS not in refused.content
            assert _reason(refused) == S.BUSY and str(tmp_path) not in _reason(refused)
        # the refusal still reports the ledger it can read (a lower bound)
        assert _metrics(_train(context, _secure(tmp_path), 2))[P.PARTICIPATIONS] == 1
        assert f"locked by another process (pid {holder.pid}" in caplog.text
    finally:
        release.set()
        holder.join(60)
    again = _train(context, _secure(tmp_path), 2)  # the kernel dropped the lock
    assert P.ARRAYS in again.content and _metrics(again)[P.PARTICIPATIONS] == 2


def test_the_lock_is_reentrant_within_a_call_and_dropped_after_it(tmp_path):
    store = DeviceStore(tmp_path, "run-a")
    with store.lock(), DeviceStore(tmp_path, "run-a").lock():  # one call, two objects
        store.save(1, {"personal.x": torch.zeros(1)}, PhotoLedger().to_config())
    with store.lock():
        pass


# --- durable writes, a full disk, left-overs -------------------------------------------

def test_atomic_write_flushes_file_and_folder_and_says_where_the_disk_is_full(tmp_path,
                                                                             monkeypatch):
    target = tmp_path / "ledger.json"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic.atomic_write(target, lambda tmp: tmp.write_text("v1"))
    assert target.read_text() == "v1" and len(synced) == 2  # the file, then the folder

    def full(tmp):
        tmp.write_text("v")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(atomic.DiskFull) as err:
        atomic.atomic_write(target, full)
    assert "the disk is full" in str(err.value) and str(tmp_path) in str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "v1" and not list(tmp_path.glob(atomic.TMP_GLOB))


def test_a_full_disk_refuses_the_round_and_sends_nothing(tmp_path, monkeypatch):
    context = _real_device(tmp_path)
    _train(context, _secure(tmp_path), 1)
    before = sorted(p.name for p in (tmp_path / STATE).iterdir())

    def full(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    reply = _train(context, _secure(tmp_path), 2)
    assert P.ARRAYS not in reply.content and _reason(reply) == S.FULL
    assert _metrics(reply)[P.PARTICIPATIONS] == 1  # the update never left: not spent
    assert sorted(p.name for p in (tmp_path / STATE).iterdir()) == before  # no half folder


def test_left_overs_of_an_interrupted_write_are_removed_when_the_lock_is_taken(tmp_path):
    store = DeviceStore(tmp_path, "run-a")
    store.save(1, {"personal.x": torch.zeros(1)}, PhotoLedger().to_config())
    half = tmp_path / ".gen-000002.tmp"
    half.mkdir()
    (half / S.LEDGER_FILE).write_text("")
    (tmp_path / ".ledger.json.123.tmp").write_text("{")
    with store.lock():
        assert sorted(p.name for p in tmp_path.iterdir()) == [S.LOCK_FILE, "gen-000001"]


# --- unreadable generations ---------------------------------------------------------------

def _two_generations(tmp_path) -> DeviceStore:
    store = DeviceStore(tmp_path, "run-a")
    for rnd in (1, 2):
        store.save(rnd, {"personal.x": torch.full((1,), float(rnd))},
                   PhotoLedger(events=[(1.0, 0.25, 4 * rnd)], participations=rnd).to_config())
    return store


@pytest.mark.parametrize("damage", [
    lambda g: (g / S.LEDGER_FILE).write_text(""),  # the rename reached the disk, the data not
    lambda g: (g / S.LEDGER_FILE).write_text('{"noise": [1.0], "rate": [0.2'),
    lambda g: (g / S.LEDGER_FILE).unlink(),  # a half-written folder
    lambda g: (g / S.LEDGER_FILE).write_text(
        '{"noise": [1.0, 1.0], "rate": [0.25], "steps": [4], "participations": 2}'),
    lambda g: (g / S.LEDGER_FILE).write_text('{"noise": [], "rate": [], "steps": []}'),
])
def test_an_unreadable_newest_ledger_is_never_replaced_by_an_older_one(tmp_path, damage):
    """The previous generation's ledger is a lower bound: training on it would
    under-count spend for good. The store refuses and names the file (for the
    device's log); the refusal carries the lower bound, never as the ledger."""
    store = _two_generations(tmp_path)
    damage(tmp_path / "gen-000002")
    with pytest.raises(S.LedgerUnreadable) as err:
        store.ledger()
    assert str(tmp_path / "gen-000002") in str(err.value)
    assert err.value.public == S.LEDGER_LOST and str(tmp_path) not in err.value.public
    assert err.value.ledger["participations"] == 1
    with pytest.raises(S.LedgerUnreadable):
        store.save(3, {"personal.x": torch.zeros(1)}, PhotoLedger().to_config())
    assert sorted(p.name for p in tmp_path.glob("gen-*")) == ["gen-000001", "gen-000002"]


def test_a_device_with_an_unreadable_newest_ledger_refuses_to_train_but_evaluates(tmp_path,
                                                                                 caplog):
    context = _real_device(tmp_path)
    for rnd in (1, 2):
        _train(context, _secure(tmp_path), rnd)
    newest = max((tmp_path / STATE).glob("gen-*"))
    (newest / S.LEDGER_FILE).write_text("")
    refused = _train(context, _secure(tmp_path), 3)
    assert P.ARRAYS not in refused.content and _reason(refused) == S.LEDGER_LOST
    assert _metrics(refused)[P.PARTICIPATIONS] == 1  # what it can vouch for; the server's
    assert str(newest) in caplog.text  # own record says 2, so it also sees the loss
    evaluated = _evaluate(context, _secure(tmp_path), 3)
    assert not _reason(evaluated) and _metrics(evaluated)[P.PERSONALISED] == 1
    # The owner moves the broken folder out, accepting the under-count knowingly.
    newest.rename(tmp_path / "broken-generation")
    again = _train(context, _secure(tmp_path), 3)
    assert P.ARRAYS in again.content and _metrics(again)[P.PARTICIPATIONS] == 2


@pytest.mark.parametrize("damage", [
    lambda g: (g / S.PERSONAL_FILE).write_bytes(b"not a torch file"),
    lambda g: (g / S.PERSONAL_FILE).unlink(),  # a half-written folder (erasure takes all)
    lambda g: (g / S.STAMP_FILE).write_text('{"run": "run-a", "round": "2"}'),
    lambda g: (g / S.STAMP_FILE).unlink(),
])
def test_unreadable_personal_weights_fall_back_to_the_generation_before(tmp_path, damage):
    store = _two_generations(tmp_path)
    damage(tmp_path / "gen-000002")
    assert store.personal(before_round=3)["personal.x"].item() == 1.0
    assert store.fallbacks and "gen-000002" in store.fallbacks[0]
    assert store.ledger()["participations"] == 2  # the ledger there is still the newest
    store.save(3, {"personal.x": torch.full((1,), 3.0)},
               PhotoLedger(events=[(1.0, 0.25, 12)], participations=3).to_config())
    fresh = DeviceStore(tmp_path, "run-a")
    assert fresh.personal(before_round=4)["personal.x"].item() == 3.0 and not fresh.fallbacks


def test_a_device_says_when_it_fell_back_and_still_trains(tmp_path, caplog):
    context = _real_device(tmp_path)
    first = _train(context, _secure(tmp_path), 1)
    assert P.STATE_FALLBACK not in _metrics(first)
    _train(context, _secure(tmp_path), 2)
    newest = max((tmp_path / STATE).glob("gen-*"))
    (newest / S.PERSONAL_FILE).write_bytes(b"")
    reply = _train(context, _secure(tmp_path), 3)
    assert P.ARRAYS in reply.content and _metrics(reply)[P.STATE_FALLBACK] == 1
    assert _metrics(reply)[P.PARTICIPATIONS] == 3 and not _reason(reply)
    assert f"{newest / S.PERSONAL_FILE} cannot be read" in caplog.text
    assert json.loads((max((tmp_path / STATE).glob("gen-*")) / S.LEDGER_FILE)
                      .read_text())["participations"] == 3
