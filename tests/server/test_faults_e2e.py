"""A hostile and broken fleet, in one real Flower simulation, stopped and resumed.

Every fault kind at once (``faults.kinds``): 11 of 14 devices misbehave. The run
finishes; the final shared weights are finite; ``fleet/devices_rejected`` and
``fleet/devices_failed`` count exactly the invalid and the silent devices; the
valid-but-hostile ones (huge_norm, flip_sign) are accepted and bounded by the
user-level clip; quality on the honest devices is never NaN. The crash and hang
devices are paused after ``fleet.unavailable_after`` (here 1) miss, so they cost
the round timeout once. One honest device is not connected in the first session (the
run starts without it), the server stops after round 2, and the resumed session
misses a different device: the absent one keeps its record, the returning one
trains. (A device is absent by not being connected when the session starts: the
grid hides its node.)
"""

from __future__ import annotations

import math

import mlflow
import pytest
import torch

from fl import faults as F
from fl import protocol as P
from fl.config import compose
from fl.tracking import keys as K
from server.checkpoint import DONE, load_checkpoint
from server.simulation import simulate
from tests.server.test_release_e2e import Passthrough

pytestmark = pytest.mark.slow

N, SHARE, ROUNDS = 14, 0.8, 3


class Session(Passthrough):
    """Hides one device's node (it is not connected when the session starts) and,
    optionally, stops the server when round ``stop_at`` is about to be sent."""

    def __init__(self, grid, absent: int, stop_at: int | None = None) -> None:
        super().__init__(grid)
        self.absent, self.stop_at = absent, stop_at

    def get_node_ids(self):
        device_of = self.grid.engine_partitions(0)  # the simulation engine's numbering
        return [n for n in self.grid.get_node_ids() if device_of[n] != self.absent]

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train" and \
                int(messages[0].content[P.CONFIG]["server-round"]) == self.stop_at:
            raise KeyboardInterrupt("the server stopped")
        return self.grid.push_messages(messages)


def test_every_fault_at_once_absent_devices_and_a_resume(tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose([*tiny_overrides, f"tracking.uri={uri}", "tracking.samples_every=0",
                   f"checkpoint.dir={tmp_path / 'checkpoints'}",
                   f"devices.storage_dir={tmp_path / 'devices'}", "privacy=photo_user",
                   f"fleet.num_devices={N}", f"fleet.devices_per_round={N}",
                   "fleet.sampling=fixed", f"fleet.rounds={ROUNDS}", "fleet.eval_devices=4",
                   "fleet.newuser_identities=0", "fleet.round_timeout=15",
                   "fleet.unavailable_after=1", "fleet.retry_after=10",
                   "fleet.start_quorum=0.9", "faults=all", f"faults.share={SHARE}"])
    faulty = F.assignment(cfg.seed, N, SHARE, list(cfg.faults.kinds))
    assert sorted(faulty.values()) == sorted(F.KINDS)
    honest = sorted(set(range(N)) - set(faulty))
    invalid = sum(kind in F.INVALID for kind in faulty.values())
    silent = sum(kind in F.ABSENT for kind in faulty.values())

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, wrap_grid=lambda g: Session(g, absent=honest[0], stop_at=3))
    checkpoint = next((tmp_path / "checkpoints").glob("*/last.pt"))
    stopped = load_checkpoint(checkpoint).loop
    assert (stopped.round, stopped.phase) == (2, DONE)
    for rnd, paused in ((1, 0), (2, silent)):
        h = stopped.history[rnd]
        assert h[K.DEVICES_ABSENT] == 1 and h[K.DEVICES_SAMPLED] == N - 1 - paused
        assert h[K.DEVICES_REJECTED] == invalid
        assert h[K.DEVICES_FAILED] == silent - paused  # the silent ones, until paused
        assert h[K.DEVICES_TRAINED] == N - 1 - invalid - silent  # honest + hostile
        assert h[K.DEVICES_UNAVAILABLE] == silent
    rows = {int(d): row for d, row in stopped.devices.items()}
    for device, kind in faulty.items():
        if kind in F.ABSENT:
            assert rows[device]["status"].startswith("failed") and rows[device]["missed"] == 1
            assert rows[device]["unavailable_until"] == 1 + 10
        elif kind in F.INVALID:
            assert rows[device]["status"].startswith("rejected"), (kind, rows[device])
    assert honest[0] not in rows  # absent all session: it never took part, has no record

    resumed = simulate(cfg, resume=load_checkpoint(checkpoint),
                       wrap_grid=lambda g: Session(g, absent=honest[1]))
    final = load_checkpoint(checkpoint).loop
    assert (final.round, final.phase, final.release["released"]) == (ROUNDS, DONE, ROUNDS)
    last = final.history[ROUNDS]
    assert last[K.DEVICES_SAMPLED] == N - 1 - silent  # the silent ones are paused
    assert last[K.DEVICES_FAILED] == 0 and last[K.DEVICES_REJECTED] == invalid
    rows = {int(d): row for d, row in final.devices.items()}
    assert rows[honest[0]]["status"] == "trained"  # back in this session
    assert rows[honest[1]]["participations"] == stopped.devices[honest[1]]["participations"]
    assert all(bool(torch.isfinite(v).all()) for v in final.shared.values())

    client = mlflow.MlflowClient(uri)
    run = client.get_run(resumed.run_id)
    assert run.data.tags["fedface.faults"] == f"share={SHARE:g} kinds={','.join(cfg.faults.kinds)}"

    def series(key):
        return [m.value for m in sorted(client.get_metric_history(resumed.run_id, key),
                                        key=lambda m: m.step)]

    assert series(K.DEVICES_REJECTED) == [invalid] * ROUNDS
    assert series(K.DEVICES_FAILED) == [silent, 0, 0]
    assert series(K.DEVICES_UNAVAILABLE) == [silent] * ROUNDS
    quality = series(K.SWAP_PSNR)
    assert len(quality) == ROUNDS + 1 and all(math.isfinite(q) for q in quality)
