"""The roll call leaves out what it cannot trust, and starts with the rest."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict

from fl import protocol as P
from server.roll_call import from_engine, learn_indices, roll_call
from tests.privacy.replies import train_reply


def _answer(node: int, index) -> Message:
    return Message(metadata=train_reply(node, {}).metadata,
                   content=RecordDict({P.METRICS: MetricRecord({P.DEVICE_INDEX: index})}))


class Grid:
    def __init__(self, replies) -> None:
        self.replies = replies

    def send_and_receive(self, messages, timeout=None):
        return list(self.replies)


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """A ServerApp's messages need the run it belongs to (Flower sets this)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def test_bad_claims_collisions_errors_and_silence_are_left_out():
    error = Message(metadata=train_reply(6, {}).metadata, error=Error(2, "boom"))
    replies = [_answer(1, 0), _answer(2, 1), _answer(3, 1), _answer(4, 7), error,
               _answer(1, 2)]  # node 1's second answer is ignored
    call = roll_call(Grid(replies), [1, 2, 3, 4, 5, 6], num_devices=5, needed=1,
                     timeout=1, log=lambda line: None)
    assert call.index == {1: 0}
    assert set(call.left_out) == {2, 3, 4, 5, 6}
    assert "as 1 other" in call.left_out[2] and "outside 0..4" in call.left_out[4]
    assert "did not answer" in call.left_out[5] and "failed" in call.left_out[6]
    with pytest.raises(RuntimeError, match="fewer than the 2 fleet.start_quorum"):
        roll_call(Grid(replies), [1, 2, 3, 4, 5, 6], num_devices=5, needed=2, timeout=1,
                  log=lambda line: None)


class EngineGrid:
    """A simulation's grid: the engine's numbering, and no roll call allowed."""

    def __init__(self, partitions, connected) -> None:
        self.partitions, self.connected = partitions, connected

    def engine_partitions(self, timeout):
        return dict(self.partitions)

    def get_node_ids(self):
        return list(self.connected)

    def send_and_receive(self, messages, timeout=None):
        raise AssertionError("a simulation must not send a roll call")


def test_simulation_reads_the_engine_numbering_and_sends_nothing():
    grid = EngineGrid({30: 2, 10: 0, 20: 1, 40: 3}, connected=[10, 20, 30])
    lines = []
    call = learn_indices(grid, num_devices=4, needed=3, timeout=1, log=lines.append)
    assert call.index == {10: 0, 20: 1, 30: 2} and list(call.index.values()) == [0, 1, 2]
    assert set(call.left_out) == {40} and "device 3" in lines[0]
    with pytest.raises(RuntimeError, match="fewer than the 4 fleet.start_quorum"):
        learn_indices(grid, num_devices=4, needed=4, timeout=1, log=lines.append)


def test_an_engine_numbering_of_another_fleet_stops_the_run():
    for partitions in ({10: 0, 20: 1, 30: 2}, {10: 0, 20: 1, 30: 1, 40: 3},
                       {10: 1, 20: 2, 30: 3, 40: 4}):
        with pytest.raises(RuntimeError, match="not running this fleet"):
            from_engine(EngineGrid(partitions, partitions), partitions, 4, 1)


def test_without_the_engine_numbering_the_roll_call_runs():
    class Deployed(Grid):
        def get_node_ids(self):
            return [1, 2]

    call = learn_indices(Deployed([_answer(1, 1), _answer(2, 0)]), num_devices=2, needed=2,
                         timeout=1, log=lambda line: None)
    assert call.index == {2: 0, 1: 1}
