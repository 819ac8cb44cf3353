"""Consent on the device: which photos may be used, for what, until when.

Each device keeps a manifest, ``consent.json``, in its own storage directory::

    {
      "format": 1,
      "photos": {
        "photo-0003": {"purposes": ["federated-training", "evaluation"],
                       "granted": "2026-11-01T09:00:00+00:00",
                       "expires": "2027-11-01T00:00:00+00:00",
                       "revoked": null}
      },
      "delete_my_data": false
    }

The device reads it at every round, so a change takes effect at the next round.
A photo is used for a purpose only if its entry lists the purpose, has been
granted, is not revoked and has not expired. A manifest is explicit: photos it
does not list are not consented. Devices without a manifest follow
``devices.consent_default`` (``grant`` or ``deny``). A manifest that cannot be
read denies everything (and the device says why): consent is never assumed
from a broken file. It is read strictly (``Manifest.from_json``: every type as
documented, no unknown key), and the reason a device sends the server says what
kind of problem and how many photos, never which (``ConsentError.public``).

``delete_my_data: true`` asks the device to erase its personal state (personal
weights, decoded photos) and stop taking part; its privacy ledger is kept, since
what was already released stays released and the accounting must stay honest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fl.atomic import atomic_write

MANIFEST = "consent.json"
FORMAT = 1
TRAINING, EVALUATION = "federated-training", "evaluation"
PURPOSES = (TRAINING, EVALUATION)
DEFAULTS = ("grant", "deny")


class ConsentError(ValueError):
    """A manifest that cannot be trusted. ``str(err)`` names the file and the
    entries at fault (for the user and the device's own log); ``public`` says
    only what kind of problem and how many photos, for the reason a device sends
    the server, which must never carry a file name, photo id or path."""

    def __init__(self, message: str, public: str = f"{MANIFEST} is invalid") -> None:
        super().__init__(message)
        self.public = public


TOP_KEYS = ("format", "photos", "delete_my_data", "deleted")
ENTRY_KEYS = ("purposes", "granted", "expires", "revoked")
# What can be wrong with a photo entry, as the device tells the server (with a count).
FAULTS = {"entry": "a value that is not an object", "unknown key": "an unknown key",
          "purposes": "a bad \"purposes\" list", "granted": "a bad \"granted\" time",
          "expires": "a bad \"expires\" time", "revoked": "a bad \"revoked\" time"}


def parse_time(value, where: str) -> datetime | None:
    """An ISO 8601 time (a JSON string; no time zone = UTC), or None for null."""
    if value is None:
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ConsentError(f"{where}: {value!r} is not an ISO 8601 time "
                           "(e.g. 2026-11-01T09:00:00+00:00)") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


@dataclass(frozen=True)
class PhotoConsent:
    purposes: frozenset[str]
    granted: datetime | None = None
    expires: datetime | None = None
    revoked: datetime | None = None

    def allows(self, purpose: str, now: datetime) -> bool:
        return (purpose in self.purposes and self.granted is not None and self.granted <= now
                and not self.withdrawn(now))

    def withdrawn(self, now: datetime) -> bool:
        """Consent that was given and no longer holds (revoked, or expired)."""
        return ((self.revoked is not None and self.revoked <= now)
                or (self.expires is not None and self.expires <= now))


def _photo_entry(entry, at: str) -> tuple[PhotoConsent | None, list[str], list[str]]:
    """(consent, problems for the log, the fields at fault) of one photo entry."""
    if not isinstance(entry, dict):
        return None, [f"{at} must be an object with {list(ENTRY_KEYS)}"], ["entry"]
    problems, fields_at_fault = [], []
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        problems.append(f"{at} has unknown keys {unknown} (allowed: {list(ENTRY_KEYS)})")
        fields_at_fault.append("unknown key")
    purposes = entry.get("purposes")
    if not (isinstance(purposes, list) and all(isinstance(p, str) and p in PURPOSES
                                               for p in purposes)):
        problems.append(f"{at}.purposes must be a list drawn from {list(PURPOSES)}, "
                        f"not {purposes!r}")
        fields_at_fault.append("purposes")
    times = {}
    for key in ("granted", "expires", "revoked"):
        try:
            times[key] = parse_time(entry.get(key), f"{at}.{key}")
        except ConsentError as err:
            problems.append(str(err))
            fields_at_fault.append(key)
    if problems:
        return None, problems, fields_at_fault
    return PhotoConsent(frozenset(purposes), **times), [], []


@dataclass
class Manifest:
    photos: dict[str, PhotoConsent] = field(default_factory=dict)
    delete_my_data: bool = False
    deleted: datetime | None = None  # when the device carried out the deletion

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse strictly: every type as documented (docs/consent.md), no unknown
        key, booleans as JSON booleans. A lenient reading fails the user: the
        string ``"false"`` is truthy, so ``"delete_my_data": "false"`` would
        erase their state; a misspelt key would silently mean nothing. Every
        problem is collected, so one message lists them all."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConsentError(f"{where} is not valid JSON ({err})",
                               f"{MANIFEST} is not valid JSON") from None
        if not isinstance(raw, dict) or type(raw.get("format")) is not int \
                or raw["format"] != FORMAT:
            raise ConsentError(f"{where}: expected an object with \"format\": {FORMAT}",
                               f"{MANIFEST} is not a format-{FORMAT} manifest")
        problems, public = [], []
        unknown = sorted(set(raw) - set(TOP_KEYS))
        if unknown:
            problems.append(f"unknown keys {unknown} (allowed: {list(TOP_KEYS)})")
            public.append(f"{len(unknown)} unknown top-level key(s)")
        delete = raw.get("delete_my_data", False)
        if not isinstance(delete, bool):
            problems.append(f"\"delete_my_data\" is {delete!r}; it must be true or false "
                            "(a JSON boolean, not a string or a number)")
            public.append("\"delete_my_data\" is not true or false")
        deleted = None
        try:
            deleted = parse_time(raw.get("deleted"), "deleted")
        except ConsentError as err:
            problems.append(str(err))
            public.append("\"deleted\" is not an ISO 8601 time")
        photos, bad = {}, {}
        entries = raw.get("photos", {})
        if not isinstance(entries, dict):
            problems.append("\"photos\" must be an object mapping photo ids to entries, "
                            f"not {type(entries).__name__}")
            public.append("\"photos\" is not an object")
            entries = {}
        for photo, entry in entries.items():
            consent, entry_problems, at_fault = _photo_entry(entry, f"photos[{photo!r}]")
            problems += entry_problems
            for name in dict.fromkeys(at_fault):
                bad[name] = bad.get(name, 0) + 1
            if consent is not None:
                photos[photo] = consent
        public += [f"{n} photo entr{'y' if n == 1 else 'ies'} with {FAULTS[name]}"
                   for name, n in bad.items()]
        if problems:
            raise ConsentError(f"{where}: " + "; ".join(problems),
                               f"{MANIFEST} is invalid: " + "; ".join(public))
        return cls(photos, delete, deleted)

    def to_json(self) -> str:
        def stamp(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        return json.dumps({
            "format": FORMAT,
            "photos": {p: {"purposes": sorted(c.purposes), "granted": stamp(c.granted),
                           "expires": stamp(c.expires), "revoked": stamp(c.revoked)}
                       for p, c in sorted(self.photos.items())},
            "delete_my_data": self.delete_my_data,
            "deleted": stamp(self.deleted),
        }, indent=2)

    # --- what a user does -------------------------------------------------------
    def grant(self, photos: Iterable[str], purposes: Sequence[str] = PURPOSES,
              now: datetime | None = None, expires: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        for photo in photos:
            self.photos[photo] = PhotoConsent(frozenset(purposes), now, expires)

    def revoke(self, photos: Iterable[str], now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        for photo in photos:
            old = self.photos.get(photo, PhotoConsent(frozenset()))
            self.photos[photo] = PhotoConsent(old.purposes, old.granted, old.expires, now)


def manifest_path(device_dir: str | Path) -> Path:
    return Path(device_dir) / MANIFEST


def read_manifest(device_dir: str | Path) -> Manifest | None:
    """The device's manifest, ``None`` if it has none; ``ConsentError`` if unreadable."""
    path = manifest_path(device_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConsentError(f"{path} cannot be read ({err})",
                           f"{MANIFEST} cannot be read") from None
    except UnicodeDecodeError:
        raise ConsentError(f"{path} is not UTF-8 text",
                           f"{MANIFEST} is not valid JSON") from None
    return Manifest.from_json(text, str(path))


def write_manifest(device_dir: str | Path, manifest: Manifest) -> Path:
    """Write atomically: a crash mid-write never leaves a half manifest behind."""
    text = manifest.to_json()
    return atomic_write(manifest_path(device_dir), lambda tmp: tmp.write_text(text))


@dataclass(frozen=True)
class Decision:
    """What consent allows this round."""

    train: tuple[bool, ...]  # per training photo: usable for federated training
    heldout: tuple[bool, ...]  # per held-out photo: usable for evaluation
    withdrawn: int  # photos whose consent was given and is now revoked or expired
    reason: str = ""  # why nothing may be used, if so (a broken manifest)


def decide(manifest: Manifest | None, default: str, train_ids: Sequence[str],
           heldout_ids: Sequence[str], now: datetime | None = None,
           error: str = "") -> Decision:
    """Apply a manifest (or the default, without one) to a device's photos."""
    if error:
        return Decision((False,) * len(train_ids), (False,) * len(heldout_ids), 0, error)
    if manifest is None:
        if default not in DEFAULTS:
            raise ConsentError(f"devices.consent_default={default!r}: choose one of {DEFAULTS}")
        ok = default == "grant"
        return Decision((ok,) * len(train_ids), (ok,) * len(heldout_ids), 0)
    now = now or datetime.now(UTC)

    def allowed(ids: Sequence[str], purpose: str) -> tuple[bool, ...]:
        return tuple(p in manifest.photos and manifest.photos[p].allows(purpose, now)
                     for p in ids)

    withdrawn = sum(manifest.photos[p].withdrawn(now)
                    for p in (*train_ids, *heldout_ids) if p in manifest.photos)
    return Decision(allowed(train_ids, TRAINING), allowed(heldout_ids, EVALUATION), withdrawn)
