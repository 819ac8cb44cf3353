"""In simulation the server learns node -> device index from Flower's engine.

One real simulation of 6 devices, 2 a round (fixed sampling, seeded), training
only, on each backend (Flower's engine, and fedface's process pool, which offers
its node ids the same way). Every message the ServerApp sends passes through the ``wrap_grid`` hook:
not one roll-call (query) message goes out. The devices that trained are the
ones a ``CohortSampler`` with the run's seed draws by device index, the device
the server believes it asked is the one whose data and store were used (the
device writes its state under its own ``partition-id``), and the checkpoint keeps
records of those devices only.
"""

from __future__ import annotations

import pytest
from flwr.app import MessageType

from fl import protocol as P
from fl.config import compose
from server.checkpoint import load_checkpoint
from server.sampling import CohortSampler
from server.simulation import simulate

pytestmark = pytest.mark.slow

N, K, ROUNDS = 6, 2, 2


class CountingGrid:
    """Passes everything through; keeps every message pushed or sent, and which
    node each training message went to."""

    def __init__(self, grid) -> None:
        self.grid, self.sent, self.replies = grid, [], []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += messages
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        self.replies += replies
        return replies

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent += messages
        return self.grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name):
        return getattr(self.grid, name)


@pytest.mark.parametrize("backend", ["ray", "pool"])
def test_no_roll_call_and_devices_train_as_the_index_the_server_drew(tiny_overrides,
                                                                     tmp_path, backend):
    storage = tmp_path / "devices"
    cfg = compose([*tiny_overrides, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                   f"devices.storage_dir={storage}", f"checkpoint.dir={tmp_path / 'ckpt'}",
                   f"fleet.num_devices={N}", f"fleet.devices_per_round={K}",
                   f"fleet.rounds={ROUNDS}", "fleet.sampling=fixed", "fleet.eval_devices=0",
                   "fleet.newuser_identities=0", "tracking.samples_every=0", "privacy=photo",
                   f"fleet.backend={backend}"])
    grids = {}

    def wrap(grid):
        grids["g"] = CountingGrid(grid)
        return grids["g"]

    summary = simulate(cfg, wrap_grid=wrap)
    grid = grids["g"]
    kinds = [m.metadata.message_type for m in grid.sent]
    assert MessageType.QUERY not in kinds and kinds == [MessageType.TRAIN] * (K * ROUNDS)

    # The cohorts are the seeded draws by device index (eval panel first: 0 devices).
    sampler = CohortSampler("fixed", K, N, int(cfg.seed))
    sampler.choose(list(range(N)), 0)
    drawn = [sorted(sampler.cohort(range(N), set(range(N)))) for _ in range(ROUNDS)]
    partitions = grid.engine_partitions(0)
    asked = [sorted(partitions[m.metadata.dst_node_id] for m in grid.sent[r * K:(r + 1) * K])
             for r in range(ROUNDS)]
    assert asked == drawn

    # Each device trained on its own data and store: the one the server drew.
    trained = {int(d.name.split("-")[1]) for d in storage.glob("device-*")
               if list(d.glob(f"state/{summary.run_id}/gen-*/ledger.json"))}
    assert trained == set(drawn[0]) | set(drawn[1])
    assert all(not r.has_error() and r.content[P.METRICS][P.TRAINED] == 1 for r in grid.replies)

    # The server keeps records of the devices that took part, and no others.
    loop = load_checkpoint(next((tmp_path / "ckpt").glob("*/last.pt"))).loop
    assert set(loop.devices) == trained
    assert all(row["participations"] == sum(d in c for c in drawn)
               for d, row in loop.devices.items())
