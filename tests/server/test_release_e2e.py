"""The release against its adversaries, in one real Flower simulation (resumed).

* A hostile device replies with NaN weights: the reply is rejected and counted,
  the run goes on, and the model stays finite (it used to turn NaN; the plain
  FedAvg path is covered by tests/privacy/test_release.py with Flower's FedAvg).
* The server dies after releasing round 1 but before the round is done, and a
  device deletes its data before the resume: the resumed run re-uses the
  persisted release of round 1 instead of drawing a second one from a different
  set of devices (whose difference would reveal an update without noise).
* Then someone resumes from an older copy of the checkpoint, with the newer
  ones out of the server's reach: the devices, which already trained later
  rounds, refuse, and the server stops with the fix before releasing anything.
"""

from __future__ import annotations

import shutil

import mlflow
import pytest
import torch

from fl import protocol as P
from fl.config import compose
from fl.data import consent
from server.checkpoint import DONE, RELEASED, load_checkpoint
from server.loop import StaleCheckpoint
from server.simulation import simulate

pytestmark = pytest.mark.slow


class Passthrough:
    def __init__(self, grid) -> None:
        self.grid = grid

    def __getattr__(self, name):
        return getattr(self.grid, name)


class NanDevice(Passthrough):
    """Rewrites the first training reply it sees into NaN weights."""

    poisoned = 0

    def pull_messages(self, message_ids):
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            if not self.poisoned and not reply.has_error() and P.ARRAYS in reply.content:
                arrays = reply.content[P.ARRAYS].to_torch_state_dict()
                reply.content[P.ARRAYS] = type(reply.content[P.ARRAYS])(
                    {k: torch.full_like(v, float("nan")) for k, v in arrays.items()})
                self.poisoned = reply.metadata.src_node_id
        return replies


class DiesBeforeEvaluating(NanDevice):
    """A hostile device in the round (``NanDevice``), then the server process
    'dies' when round ``at`` goes to the evaluation panel, i.e. after the round's
    release, before the round is done; it keeps a copy of the last checkpoint
    before the round started."""

    def __init__(self, grid, at: int, checkpoint, keep) -> None:
        super().__init__(grid)
        self.at, self.checkpoint, self.keep = at, checkpoint, keep

    def push_messages(self, messages):
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        rnd = int(messages[0].content[P.CONFIG]["server-round"]) if messages else -1
        if kind == "train" and rnd == self.at:
            shutil.copy(self.checkpoint(), self.keep)
        if kind == "evaluate" and rnd == self.at:
            raise KeyboardInterrupt("the server died")
        return self.grid.push_messages(messages)


def _config(tiny_overrides, tmp_path, extra):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return compose([*tiny_overrides, f"tracking.uri={uri}", "tracking.samples_every=0",
                    f"checkpoint.dir={tmp_path / 'checkpoints'}",
                    f"devices.storage_dir={tmp_path / 'devices'}", *extra]), uri


def test_hostile_reply_crash_after_release_replay_and_stale_resume(tiny_overrides, tmp_path):
    cfg, uri = _config(tiny_overrides, tmp_path, [
        "privacy=photo_user", "fleet.rounds=2", "fleet.sampling=fixed",
        "fleet.newuser_identities=0"])
    runs = tmp_path / "checkpoints"
    before_round_1 = tmp_path / "round0.pt"

    def newest():
        return next(runs.glob("*/last.pt"))

    grids = {}
    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, wrap_grid=lambda g: grids.setdefault(
            "g", DiesBeforeEvaluating(g, 1, newest, before_round_1)))
    stopped = load_checkpoint(newest())
    assert (stopped.loop.round, stopped.loop.phase) == (1, RELEASED)
    first_release = {k: v.clone() for k, v in stopped.loop.shared.items()}
    # The NaN reply was rejected and counted; the release stayed finite.
    assert grids["g"].poisoned
    assert stopped.loop.history[1]["fleet/devices_rejected"] == 1
    assert stopped.loop.history[1]["fleet/devices_failed"] == 0
    assert stopped.loop.history[1]["fleet/devices_trained"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in first_release.values())
    assert any("non-finite" in row["status"] for row in stopped.loop.devices.values())

    # A different set of devices before the replay: device 2 deletes its data.
    consent.write_manifest(tmp_path / "devices" / "device-00002",
                           consent.Manifest(delete_my_data=True))
    resumed = simulate(cfg, resume=stopped)
    assert resumed.run_id == stopped.run_id
    # Round 1 was not drawn again: its metrics are those of the first attempt...
    assert resumed.history[1]["fleet/devices_trained"] == 2
    final = load_checkpoint(newest()).loop
    assert (final.round, final.phase, final.release["released"]) == (2, DONE, 2)
    # ...and round 2 started from exactly the persisted release of round 1.
    metrics = mlflow.MlflowClient(uri).get_metric_history(stopped.run_id, "fleet/devices_trained")
    assert sorted(m.step for m in metrics) == [1, 2]  # each round logged once
    assert resumed.history[2]["fleet/devices_trained"] == 2  # device 2 gone

    # The checkpoint from before round 1, with the newer ones out of reach.
    old = load_checkpoint(before_round_1)
    assert (old.loop.round, old.loop.phase) == (0, DONE)
    shutil.rmtree(runs)
    with pytest.raises(StaleCheckpoint, match="older than the devices' state"):
        simulate(cfg, resume=old)
    assert all(torch.equal(first_release[k], stopped.loop.shared[k]) for k in first_release)
