"""What a device keeps between rounds: its personal weights and photo-level ledger.

They live in the device's own directory and nowhere else: not in replies, not
in the server's checkpoint, not in MLflow.

* deployment: the directory given as ``--node-config "state-dir=/path"``; one
  ledger across runs, because the same photos are spent again by every run;
* simulation: ``<devices.storage_dir>/device-NNNNN/state/<MLflow run id>``, so the
  experiments of a sweep never share a ledger while a resumed run (same run id)
  finds its devices' state again.

State is kept in **generations** stamped with the run and the server round that
wrote them (``gen-000007/{personal.pt, ledger.json, stamp.json}``, each written
whole and renamed into place), numbered in the order they were written.

A server stopped mid-way resumes from its last checkpoint, so it may send round
r again to a device that already trained round r. The two halves of the state
then go different ways:

* the **personal weights** start from the generation before round r, so the
  repeated round builds on the same state as the first attempt;
* the **ledger** never goes back: it is always the newest generation's, of any
  round and any run. The first attempt's update has left the device whether or
  not the server kept it, and a repeated round is in general not the same
  release again: the photos may have changed in between (consent, deletion),
  and under ``privacy.noise=secure`` the noise is fresh anyway. Rolling the
  ledger back would count two different releases as one.

One case is the same release: a seeded replay over unchanged photos reproduces
the first attempt's update bit for bit, and publishing the same value twice
reveals nothing new. Each generation's stamp keeps a digest of the update it
sent (``update_digest``); a replay whose update has the same digest is counted
once (``clients.app``), which is what makes a resumed seeded run spend exactly
what an uninterrupted one spends. Any other replay is counted again.

Every save writes a new generation whose ledger extends the newest one on disk
(``DeviceStore.save`` refuses one with fewer participations), so the newest
generation's ledger holds everything ever spent, and pruning older generations
loses none of it.

A device whose newest generation *of this run* is stamped with a later round
than the one it is asked to train knows the server went back to an older
checkpoint than its own state; it refuses (``newest_round``, ``clients.app``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from flwr.app import Context
from torch import nn

from fl import protocol as P
from fl.privacy.ledger import PhotoLedger
from fl.tasks.base import Task

STATE_DIR_KEY = "state-dir"  # node config of a real device
PERSONAL_FILE, LEDGER_FILE, STAMP_FILE = "personal.pt", "ledger.json", "stamp.json"
GENERATION_PREFIX = "gen-"


class DeviceStore:
    """One device's generations of state under ``root``."""

    def __init__(self, root: str | Path, run: str) -> None:
        self.root, self.run = Path(root), run

    def _generations(self) -> list[tuple[int, dict, Path]]:
        """(sequence number, stamp, directory), oldest first. Read from disk every
        time (at most two small folders): another process may have written since."""
        found = []
        for folder in self.root.glob(f"{GENERATION_PREFIX}*"):
            stamp_file = folder / STAMP_FILE
            if folder.is_dir() and stamp_file.is_file():
                found.append((int(folder.name[len(GENERATION_PREFIX):]),
                              json.loads(stamp_file.read_text()), folder))
        return sorted(found, key=lambda g: g[0])

    def _before(self, generations: list, before_round: int) -> Path | None:
        """The newest generation the personal weights of ``before_round`` of this
        run build on: of an earlier run, or of this run's earlier rounds."""
        visible = [folder for _, stamp, folder in generations
                   if stamp["run"] != self.run or stamp["round"] < before_round]
        return visible[-1] if visible else None

    def personal(self, before_round: int) -> dict[str, torch.Tensor] | None:
        """Personal weights as they were before ``before_round`` of this run."""
        folder = self._before(self._generations(), before_round)
        path = folder / PERSONAL_FILE if folder else None
        if path is None or not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def ledger_before(self, before_round: int) -> dict | None:
        """The ledger as it was before ``before_round`` of this run (what the first
        attempt of that round started from)."""
        folder = self._before(self._generations(), before_round)
        return json.loads((folder / LEDGER_FILE).read_text()) if folder else None

    def attempt_digest(self, server_round: int) -> str | None:
        """The update digest of an earlier attempt of ``server_round`` of this run
        (one the server abandoned before releasing it), or None."""
        digests = [stamp.get("digest", "") for _, stamp, _ in self._generations()
                   if stamp["run"] == self.run and stamp["round"] == server_round]
        return digests[-1] if digests else None

    def ledger(self) -> dict | None:
        """The newest ledger, whatever round or run wrote it: it is never rolled
        back (module docstring)."""
        generations = self._generations()
        return json.loads((generations[-1][2] / LEDGER_FILE).read_text()) if generations else None

    def newest_round(self) -> int | None:
        """The round stamped on this run's newest generation (None before its first)."""
        own = [stamp["round"] for _, stamp, _ in self._generations() if stamp["run"] == self.run]
        return int(own[-1]) if own else None

    def save(self, server_round: int, personal: dict[str, torch.Tensor], ledger: dict,
             digest: str = "") -> Path:
        """Write the state after ``server_round`` as a new generation, then drop
        every generation except it and the one its personal weights built on.

        ``ledger`` must extend the newest one on disk (it was loaded from it):
        one with fewer participations would forget privacy already spent.
        """
        generations = self._generations()
        newest = json.loads((generations[-1][2] / LEDGER_FILE).read_text()) if generations else {}
        if int(ledger.get("participations", 0)) < int(newest.get("participations", 0)):
            raise RuntimeError(
                f"refusing to save a ledger with {ledger.get('participations', 0)} "
                f"participations over one with {newest['participations']} in "
                f"{generations[-1][2]}: privacy already spent would be forgotten")
        sequence = generations[-1][0] + 1 if generations else 1
        final = self.root / f"{GENERATION_PREFIX}{sequence:06d}"
        tmp = self.root / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(personal, tmp / PERSONAL_FILE)
        (tmp / LEDGER_FILE).write_text(json.dumps(ledger))
        (tmp / STAMP_FILE).write_text(json.dumps({"run": self.run, "round": server_round,
                                                   "digest": digest}))
        tmp.rename(final)
        # Kept: the new generation (the newest ledger, which holds every earlier
        # one's events, and the personal weights after this round) and the one a
        # repeat of this round builds its personal weights on. Older generations
        # and superseded attempts of this round hold nothing else that is needed.
        base = self._before(generations, server_round)
        for _, _, folder in generations:
            if folder != base:
                shutil.rmtree(folder, ignore_errors=True)
        return final


def device_root(context: Context, recipe: P.Recipe, device: int) -> Path:
    if STATE_DIR_KEY in context.node_config:
        return Path(str(context.node_config[STATE_DIR_KEY]))
    return Path(recipe.device_storage) / f"device-{device:05d}" / "state" / (recipe.run or "local")


def device_store(context: Context, recipe: P.Recipe, device: int) -> DeviceStore:
    return DeviceStore(device_root(context, recipe, device), recipe.run)


def erase_all_personal(context: Context, recipe: P.Recipe, device: int) -> None:
    """Remove the device's personal weights of every run (simulation) or of its
    state directory (deployment)."""
    root = device_root(context, recipe, device)
    if STATE_DIR_KEY not in context.node_config:
        root = root.parent  # every run's state of this simulated device
    for path in root.rglob(PERSONAL_FILE):
        path.unlink()


def load_personal(store: DeviceStore, before_round: int, model: nn.Module, task: Task,
                  init: dict[str, torch.Tensor]) -> bool:
    """Load the device's personal weights, or ``init`` before its first round.
    Returns whether the device had personal weights of its own."""
    own = store.personal(before_round)
    personal = {k: v for k, v in (own or init).items() if task.is_personal(k)}
    missing = set(task.personal_state(model)) - set(personal)
    if missing:
        raise ValueError(f"personal state lacks {sorted(missing)}; was it saved by another task?")
    model.load_state_dict(personal, strict=False)
    return own is not None


def load_ledger(store: DeviceStore, accountant: str) -> PhotoLedger:
    """The device's newest ledger (never one of an earlier round: module docstring)."""
    config = store.ledger()
    return PhotoLedger.from_config(config) if config else PhotoLedger(accountant=accountant)


def load_ledger_before(store: DeviceStore, before_round: int, accountant: str) -> PhotoLedger:
    config = store.ledger_before(before_round)
    return PhotoLedger.from_config(config) if config else PhotoLedger(accountant=accountant)


def update_digest(update: dict[str, torch.Tensor]) -> str:
    """SHA-256 of an update's names, dtypes, shapes and bytes: equal digests mean
    the same values left the device."""
    h = hashlib.sha256()
    for key in sorted(update):
        value = update[key].detach().cpu().contiguous()
        h.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        h.update(value.numpy().tobytes())
    return h.hexdigest()


def save_state(store: DeviceStore, server_round: int, model: nn.Module, task: Task,
               ledger: PhotoLedger, digest: str = "") -> None:
    personal = {k: v.detach().clone() for k, v in task.personal_state(model).items()}
    store.save(server_round, personal, ledger.to_config(), digest)
