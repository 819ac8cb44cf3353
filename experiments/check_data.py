"""List what a dataset's devices would skip, convert or exclude, before (or after) a run.

    python -m experiments.check_data data=folders data.root=/data/lfw devices.consent_default=deny

Devices report only counts to the server (file names can be people's names); the
researcher who holds the dataset reads the file list here. It decodes every
device's photos exactly as the devices do, prints one line per unusable or
converted file, one per excluded device, and totals.
"""

from __future__ import annotations

import sys

from fl.config import ConfigError, compose, fleet_spec, validate
from fl.data.device_data import load_device_data


def main(overrides: list[str]) -> int:
    cfg = compose(overrides)
    try:
        validate(cfg)
    except ConfigError as err:
        print(f"fedface: invalid configuration: {err}", file=sys.stderr)
        return 2
    spec = fleet_spec(cfg)
    skipped = converted = excluded = 0
    for device in range(spec.num_devices):
        data = load_device_data(spec, device)
        for photo, why in data.skipped:
            print(f"device-{device:05d}  skipped    {photo}: {why}")
        for photo, how in data.converted:
            print(f"device-{device:05d}  converted  {photo}: {how}")
        if data.excluded:
            print(f"device-{device:05d}  EXCLUDED   {data.excluded}")
        skipped += len(data.skipped)
        converted += len(data.converted)
        excluded += bool(data.excluded)
    print(f"{spec.num_devices} devices ({cfg.data.source}): {skipped} files skipped, "
          f"{converted} converted, {excluded} devices excluded")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
