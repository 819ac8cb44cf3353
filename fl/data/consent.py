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
from a broken file.

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
    """A manifest that cannot be trusted; the message says which file and why."""


def _time(value, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
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


@dataclass
class Manifest:
    photos: dict[str, PhotoConsent] = field(default_factory=dict)
    delete_my_data: bool = False
    deleted: datetime | None = None  # when the device carried out the deletion

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConsentError(f"{where} is not valid JSON ({err})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ConsentError(f"{where}: expected an object with \"format\": {FORMAT}")
        photos = {}
        for photo, entry in (raw.get("photos") or {}).items():
            at = f"{where}: photos[{photo!r}]"
            purposes = entry.get("purposes") if isinstance(entry, dict) else None
            if not isinstance(purposes, list) or not set(purposes) <= set(PURPOSES):
                raise ConsentError(f"{at}.purposes must be a list drawn from {list(PURPOSES)}")
            photos[str(photo)] = PhotoConsent(
                frozenset(purposes), _time(entry.get("granted"), f"{at}.granted"),
                _time(entry.get("expires"), f"{at}.expires"),
                _time(entry.get("revoked"), f"{at}.revoked"))
        return cls(photos, bool(raw.get("delete_my_data", False)),
                   _time(raw.get("deleted"), f"{where}: deleted"))

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
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConsentError(f"{path} cannot be read ({err})") from None
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
