"""Write SynthFaces identities to disk in a real dataset's layout.

    python -m experiments.export_data --layout folders --out data/synth-lfw --people 20 --photos 30
    python -m experiments.export_data --layout celeba  --out data/synth-celeba --people 20 --photos 30

Then train on it like on the real thing, e.g.
``python -m experiments.train data=folders data.root=data/synth-lfw
data.controls_csv=data/synth-lfw/controls.csv devices.consent_default=grant task=portrait``.
"""

from __future__ import annotations

import argparse
import sys

from fl.data.export import export_celeba, export_folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.export_data")
    parser.add_argument("--layout", choices=("folders", "celeba"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--people", type=int, default=20)
    parser.add_argument("--photos", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layout == "folders":
        root = export_folders(args.out, args.people, args.photos, args.seed)
    else:
        root = export_celeba(args.out, args.people, args.photos, args.seed)
    print(f"wrote {args.people} identities x {args.photos} photos ({args.layout} layout) to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
