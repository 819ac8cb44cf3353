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

**Fitted with or without DP.** Each stamp says whether its personal weights were
fitted under photo-level DP only (``personal_dp``): false for a personal part
enrolled on the device without DP (``experiments.enroll``) or trained in a run
without photo-level DP. Such a part carries its photos' information outside any
accounting, so a device refuses to train with it under photo-level DP
(``fitted_without_dp``, ``clients.app``; docs/privacy.md). Stamps written before
the key existed count as fitted with DP, as every personal part then was, except
those of runs without photo-level DP.

**One process at a time.** A store is used under an exclusive, non-blocking
``fcntl`` lock on ``<root>/.lock`` (``DeviceStore.lock``), held for one whole
ClientApp call: read the ledger, train, save. Without it two processes on one
directory (a second run, a stale SuperNode, two simulations given the same
storage) each read ledger n and each save n + 1: steps run, the ledger forgets
them. A call that finds the lock held does not wait: it refuses with a reason
(``StoreUnavailable``). The kernel drops the lock when its holder exits, so a
crashed process never leaves the directory locked. (``flock`` is not reliable on
network file systems; keep a state directory on a local disk.)

**Durable writes.** Every file of a generation is flushed (``fsync``) before the
folder is renamed into place, and the parent afterwards (``fl.atomic``). A
temporary folder a crash left behind (``.gen-NNNNNN.tmp``) is removed when the
lock is next taken. A full disk refuses the round before anything leaves.

**An unreadable generation.** Storage can still fail (a damaged disk, a person
editing files). The two halves again go different ways:

* **personal weights** of an unreadable generation (a broken ``personal.pt`` or
  stamp) fall back to the previous generation's, or to the public start. That
  costs quality, never privacy, and is reported: a log line, and
  ``state-fallback = 1`` in the reply's metrics (``DeviceStore.fallbacks``);
* the **ledger** does not fall back. If the newest generation's ``ledger.json``
  is missing, empty or not a ledger, the previous generation's is a lower bound:
  the lost one recorded at least one more participation, of unknown size.
  Training on it would under-count privacy already spent, silently and for good.
  The device refuses to train (``LedgerUnreadable``, a reason sent to the
  server) until its owner restores the file, or moves the broken folder out of
  the state directory, accepting the under-count knowingly. Evaluation, which
  spends no photo-level budget, goes on.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from flwr.app import Context
from torch import nn

from fl import protocol as P
from fl.atomic import DiskFull, fsync_dir, remove_leftovers, write_synced
from fl.privacy.ledger import PhotoLedger
from fl.tasks.base import Task

log = logging.getLogger(__name__)

STATE_DIR_KEY = "state-dir"  # node config of a real device
PERSONAL_FILE, LEDGER_FILE, STAMP_FILE = "personal.pt", "ledger.json", "stamp.json"
GENERATION_PREFIX = "gen-"
GENERATION = re.compile(rf"^{GENERATION_PREFIX}(\d{{6,}})$")
LOCK_FILE = ".lock"
PERSONAL_DP = "personal_dp"  # stamp key: the personal part was fitted under photo-level DP

# Reasons sent to the server: they say what happened and what to do, and name no
# path (the device's own log has the details).
BUSY = ("refused: this device's state directory is in use by another process (a second "
        "run or a stale SuperNode on the same state-dir); nothing was trained. Stop the "
        "other one, or give each SuperNode its own state-dir")
LEDGER_LOST = ("refused: this device's newest privacy ledger cannot be read (damaged "
               "storage); training on an older one would under-count privacy already "
               "spent. Its owner must restore it (the device's log says where)")
FULL = ("refused: this device's storage is full; nothing was sent. Its owner must free "
        "space on the disk of its state-dir")
UNUSABLE = ("refused: this device's state directory cannot be used (the device's log "
            "says why); nothing was trained")


class StoreUnavailable(RuntimeError):
    """This call cannot use the device's store. ``str(err)`` is for the device's
    own log and names paths; ``public`` is the one-line reason sent to the server,
    which names none. ``ledger``: the newest ledger the device can vouch for, as a
    lower bound, for the refusal's metrics (None: unknown)."""

    def __init__(self, detail: str, public: str, ledger: dict | None = None) -> None:
        super().__init__(detail)
        self.public, self.ledger = public, ledger


class LedgerUnreadable(StoreUnavailable):
    """The newest generation's ledger cannot be read: refuse, never fall back."""


# Roots this process holds the lock of, and the thread holding each: a call holds
# its store's lock once, and the store objects it makes inside share it.
_HELD: dict[Path, int] = {}
_HELD_GUARD = threading.Lock()


@dataclass(frozen=True)
class Generation:
    sequence: int
    folder: Path
    stamp: dict | None  # None: missing or unreadable (the folder is still counted)

    @property
    def readable(self) -> bool:
        return self.stamp is not None


def _read_stamp(folder: Path) -> dict | None:
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(stamp, dict) and isinstance(stamp.get("run"), str)
            and type(stamp.get("round")) is int and isinstance(stamp.get("digest", ""), str)
            and isinstance(stamp.get(PERSONAL_DP, True), bool)):
        return None
    return stamp


def _read_ledger(folder: Path) -> dict:
    """The ledger config in ``folder``; ValueError, naming the file, if it is
    missing, empty or not a ledger (a truncated list would under-count)."""
    path = folder / LEDGER_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({err})") from None
    lists = [raw.get(k) for k in ("noise", "rate", "steps")] if isinstance(raw, dict) else []

    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
            and v >= 0

    if not (lists and all(isinstance(v, list) for v in lists)
            and len({len(v) for v in lists}) == 1
            and all(number(v) for v in lists[0] + lists[1])
            and all(type(n) is int and n >= 0 for n in lists[2])
            and type(raw.get("participations")) is int and raw["participations"] >= 0
            and isinstance(raw.get("accountant", "rdp"), str)):
        raise ValueError(f"{path} is not a ledger (noise, rate, steps lists of one length "
                         "and a participation count)")
    return raw


class DeviceStore:
    """One device's generations of state under ``root``."""

    def __init__(self, root: str | Path, run: str) -> None:
        self.root, self.run = Path(root), run
        self.fallbacks: list[str] = []  # unreadable generations passed over (log lines)
        self.personal_source: Generation | None = None  # where the last personal weights came from

    # --- the lock -------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory for this process (re-entrant within one thread).
        Raises ``StoreUnavailable`` at once if another process holds it. On taking
        it, temporary files a crashed writer left are removed."""
        key = self.root.absolute()
        me = threading.get_ident()
        with _HELD_GUARD:
            holder = _HELD.get(key)
        if holder == me:
            yield
            return
        if holder is not None:
            raise StoreUnavailable(f"{self.root} is in use by another thread of this process",
                                   BUSY, self._ledger_lower_bound())
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise StoreUnavailable(f"state directory {self.root} cannot be used ({err})",
                                   FULL if err.errno in (errno.ENOSPC, errno.EDQUOT)
                                   else UNUSABLE) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held_by = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise StoreUnavailable(
                    f"state directory {self.root} is locked by another process ({held_by}); "
                    "two processes must never write one device's state at once",
                    BUSY, self._ledger_lower_bound()) from None
            try:  # who holds it, for the message another process gets
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}, run {self.run or '-'}, since "
                              f"{datetime.now(UTC).isoformat(timespec='seconds')}".encode(), 0)
            except OSError:
                pass
            for path in remove_leftovers(self.root):
                log.warning("device state: removed %s, left by an interrupted write", path)
            with _HELD_GUARD:
                _HELD[key] = me
            try:
                yield
            finally:
                with _HELD_GUARD:
                    _HELD.pop(key, None)
        finally:
            os.close(fd)  # releases the lock

    # --- reading ----------------------------------------------------------------------
    def _generations(self) -> list[Generation]:
        """Every generation folder, oldest first, with its stamp if readable. Read
        from disk every time (at most a few small folders): another process may
        have written since."""
        found = []
        for folder in self.root.glob(f"{GENERATION_PREFIX}*"):
            match = GENERATION.match(folder.name)
            if match and folder.is_dir():
                found.append(Generation(int(match.group(1)), folder, _read_stamp(folder)))
        return sorted(found, key=lambda g: g.sequence)

    def _fell_back(self, note: str) -> None:
        log.warning("device state: %s", note)
        self.fallbacks.append(note)

    def _before(self, generations: list[Generation], before_round: int) -> Generation | None:
        """The newest readable generation the personal weights of ``before_round``
        of this run build on: of an earlier run, or of this run's earlier rounds."""
        visible = [g for g in generations if g.readable and (
            g.stamp["run"] != self.run or g.stamp["round"] < before_round)]
        return visible[-1] if visible else None

    def personal(self, before_round: int) -> dict[str, torch.Tensor] | None:
        """Personal weights as they were before ``before_round`` of this run, or
        None (never trained, or erased). An unreadable generation is passed over
        for the one before it, and the fallback recorded (module docstring)."""
        generations = self._generations()
        base = self._before(generations, before_round)
        newer_broken = [g for g in generations if not g.readable
                        and (base is None or g.sequence > base.sequence)]
        for g in newer_broken:
            self._fell_back(f"{g.folder / STAMP_FILE} is unreadable; its personal weights "
                            "are not used")
        return self._personal_from(base, generations)

    def _personal_from(self, base: Generation | None,
                       generations: list[Generation]) -> dict[str, torch.Tensor] | None:
        self.personal_source = None
        while base is not None:
            path = base.folder / PERSONAL_FILE
            older = [g for g in generations if g.readable and g.sequence < base.sequence]
            if not path.is_file():
                # "Delete my data" erases every generation's: nothing to fall back on.
                # Only a damaged folder lacks the file while an older one has it.
                if not any((g.folder / PERSONAL_FILE).is_file() for g in older):
                    return None
                problem = "is missing"
            else:
                try:
                    weights = torch.load(path, map_location="cpu", weights_only=True)
                    if isinstance(weights, dict) and all(isinstance(v, torch.Tensor)
                                                         for v in weights.values()):
                        self.personal_source = base
                        return weights
                    problem = "holds no tensors"
                except Exception as err:  # noqa: BLE001 - torch raises many types
                    problem = f"cannot be read ({type(err).__name__})"
            self._fell_back(f"{path} {problem}; falling back to "
                            f"{older[-1].folder.name if older else 'the public start'}")
            base = older[-1] if older else None
        return None

    def personal_of_run(self, run: str) -> dict[str, torch.Tensor] | None:
        """The personal weights of ``run``'s newest generation here (None if the
        store holds none of that run)."""
        generations = self._generations()
        own = [g for g in generations if g.readable and g.stamp["run"] == run]
        return self._personal_from(own[-1], generations) if own else None

    def runs(self) -> list[str]:
        """The runs whose generations this store holds, oldest first."""
        return list(dict.fromkeys(g.stamp["run"] for g in self._generations() if g.readable))

    def ledger(self) -> dict | None:
        """The newest ledger, whatever round or run wrote it: it is never rolled
        back (module docstring). ``LedgerUnreadable`` if it cannot be read."""
        generations = self._generations()
        if not generations:
            return None
        try:
            return _read_ledger(generations[-1].folder)
        except ValueError as err:
            raise LedgerUnreadable(
                f"{err}: refusing to train on an older ledger, which would under-count "
                "privacy already spent. Restore the file, or move "
                f"{generations[-1].folder} out of {self.root} to accept that under-count",
                LEDGER_LOST, self._ledger_lower_bound()) from None

    def _ledger_lower_bound(self) -> dict | None:
        """The newest ledger that can be read (a lower bound on what was spent),
        for a refusal's metrics only; never to train on."""
        for g in reversed(self._generations()):
            try:
                return _read_ledger(g.folder)
            except ValueError:
                continue
        return None

    def ledger_before(self, before_round: int) -> dict | None:
        """The ledger as it was before ``before_round`` of this run (what the first
        attempt of that round started from). If it cannot be read, the newest
        ledger, which holds at least as much spend (a stricter budget check)."""
        base = self._before(self._generations(), before_round)
        if base is None:
            return None
        try:
            return _read_ledger(base.folder)
        except ValueError as err:
            self._fell_back(f"{err}; checking the budget against the newest ledger")
            return self.ledger()

    def attempt_digest(self, server_round: int) -> str | None:
        """The update digest of an earlier attempt of ``server_round`` of this run
        (one the server abandoned before releasing it), or None."""
        digests = [g.stamp.get("digest", "") for g in self._generations() if g.readable
                   and g.stamp["run"] == self.run and g.stamp["round"] == server_round]
        return digests[-1] if digests else None

    def newest_round(self) -> int | None:
        """The round stamped on this run's newest generation (None before its first)."""
        own = [g.stamp["round"] for g in self._generations()
               if g.readable and g.stamp["run"] == self.run]
        return int(own[-1]) if own else None

    # --- writing ----------------------------------------------------------------------
    def fitted_without_dp(self) -> bool:
        """Whether the personal weights last read (``personal``, ``personal_of_run``)
        were fitted without photo-level DP: by ``experiments.enroll``, or in a run
        without it. A stamp written before this was recorded counts as fitted
        with DP, as every device's personal part then was (module docstring)."""
        source = self.personal_source
        return source is not None and source.stamp.get(PERSONAL_DP, True) is False

    def save(self, server_round: int, personal: dict[str, torch.Tensor], ledger: dict,
             digest: str = "", personal_dp: bool = True) -> Path:
        """Write the state after ``server_round`` as a new generation, then drop
        every generation except it and the one its personal weights built on.

        ``ledger`` must extend the newest one on disk (it was loaded from it):
        one with fewer participations would forget privacy already spent. Holds
        the lock (already held inside a ClientApp call). A full disk raises
        ``StoreUnavailable`` and leaves the previous generations as they were.
        """
        with self.lock():
            return self._save(server_round, personal, ledger, digest, personal_dp)

    def _save(self, server_round: int, personal: dict[str, torch.Tensor], ledger: dict,
              digest: str, personal_dp: bool) -> Path:
        generations = self._generations()
        newest = self.ledger() or {}
        if int(ledger.get("participations", 0)) < int(newest.get("participations", 0)):
            raise RuntimeError(
                f"refusing to save a ledger with {ledger.get('participations', 0)} "
                f"participations over one with {newest['participations']} in "
                f"{generations[-1].folder}: privacy already spent would be forgotten")
        sequence = generations[-1].sequence + 1 if generations else 1
        final = self.root / f"{GENERATION_PREFIX}{sequence:06d}"
        tmp = self.root / f".{final.name}.tmp"
        stamp = {"run": self.run, "round": server_round, "digest": digest,
                 PERSONAL_DP: bool(personal_dp)}
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_synced(tmp / PERSONAL_FILE, lambda p: torch.save(personal, p))
            write_synced(tmp / LEDGER_FILE, lambda p: p.write_text(json.dumps(ledger)))
            write_synced(tmp / STAMP_FILE, lambda p: p.write_text(json.dumps(stamp)))
            fsync_dir(tmp)
            tmp.rename(final)
            fsync_dir(self.root)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, DiskFull) or err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreUnavailable(str(err), FULL, newest or None) from err
            raise
        # Kept: the new generation (the newest ledger, which holds every earlier
        # one's events, and the personal weights after this round) and the one a
        # repeat of this round builds its personal weights on. Older generations,
        # superseded attempts of this round and unreadable ones hold nothing else
        # that is needed (an unreadable newest ledger never gets this far).
        base = self._before(generations, server_round)
        for g in generations:
            if base is None or g.folder != base.folder:
                shutil.rmtree(g.folder, ignore_errors=True)
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
               ledger: PhotoLedger, digest: str = "", personal_dp: bool = True) -> None:
    """``personal_dp``: whether the personal part was fitted under photo-level DP
    only (stamped; ``DeviceStore.fitted_without_dp``)."""
    personal = {k: v.detach().clone() for k, v in task.personal_state(model).items()}
    store.save(server_round, personal, ledger.to_config(), digest, personal_dp)
