"""The roll call leaves out what it cannot trust, and starts with the rest."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict

from fl import protocol as P
from server.roll_call import roll_call
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
