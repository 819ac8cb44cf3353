"""A user's side of consent: show, grant, revoke, or delete my data.

    python -m experiments.consent show   --device-dir .fedface-devices/synthfaces/device-00042
    python -m experiments.consent grant  --device-dir DIR --photos photo-0000 photo-0001 \\
        [--purposes federated-training evaluation] [--expires 2027-11-01T00:00:00+00:00]
    python -m experiments.consent revoke --device-dir DIR --photos photo-0001
    python -m experiments.consent delete --device-dir DIR

Photo ids are ``photo-NNNN`` for SynthFaces devices and the path relative to
``data.root`` for CelebA and folders (``000123.jpg``, ``Person_Name/Person_Name_0001.jpg``).
Changes take effect at the device's next round (docs/consent.md).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from fl.data import consent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.consent",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("show", "grant", "revoke", "delete"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--device-dir", required=True, help="the device's own directory")
        if name in ("grant", "revoke"):
            cmd.add_argument("--photos", nargs="+", required=True, help="photo ids")
        if name == "grant":
            cmd.add_argument("--purposes", nargs="+", default=list(consent.PURPOSES),
                             choices=consent.PURPOSES)
            cmd.add_argument("--expires", default=None, help="ISO 8601 time (optional)")
    return parser


def _expiry(text: str | None, now: datetime) -> datetime | None:
    expires = consent.parse_time(text, "--expires")
    if expires is not None and expires <= now:
        raise consent.ConsentError(f"--expires {text}: that time has passed, so the grant "
                                   "would never apply; give a later time or leave it out")
    return expires


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not Path(args.device_dir).is_dir():
        # A typo would otherwise create a new folder that no device ever reads.
        print(f"fedface: {args.device_dir} is not a directory: give the device's own "
              "directory (a SuperNode's data-dir, or <devices.storage_dir>/device-NNNNN in "
              "simulation; create it first to prepare consent before a run)", file=sys.stderr)
        return 2
    now = datetime.now(UTC)
    try:
        expires = _expiry(args.expires, now) if args.command == "grant" else None
    except consent.ConsentError as err:
        print(f"fedface: {err}", file=sys.stderr)
        return 2
    try:
        manifest = consent.read_manifest(args.device_dir)
    except consent.ConsentError as err:
        print(f"fedface: {err}; fix or remove the file first", file=sys.stderr)
        return 2
    if args.command == "show":
        print(manifest.to_json() if manifest else
              f"no manifest in {args.device_dir}: the run's devices.consent_default applies")
        return 0
    manifest = manifest or consent.Manifest()
    if args.command == "grant":
        manifest.grant(args.photos, args.purposes, now, expires)
    elif args.command == "revoke":
        manifest.revoke(args.photos, now)
    else:
        manifest.delete_my_data = True
    try:
        path = consent.write_manifest(args.device_dir, manifest)
    except OSError as err:  # a full disk (fl.atomic.DiskFull), a read-only folder
        print(f"fedface: nothing changed: {err}", file=sys.stderr)
        return 2
    print(f"{args.command}: written to {path}; takes effect at the device's next round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
