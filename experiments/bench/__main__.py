"""Benchmarks: ``python -m experiments.bench [renderer|local_step|fleet ...]``.

Prints markdown tables (medians of repeated runs) and writes JSON to
``bench-results/``. Numbers are measurements to quote, never test assertions.
"""

from __future__ import annotations

import sys

from experiments.bench import (
    fleet,
    fleet_scale,
    import_time,
    init_and_personal,
    local_step,
    poisoning,
    privacy_utility,
    renderer,
    secagg,
    tracking_overhead,
)
from experiments.bench.common import save, table

BENCHES = {"renderer": renderer.run, "local_step": local_step.run, "fleet": fleet.run,
           "fleet_parts": fleet.breakdown,
           "privacy_utility": privacy_utility.run, "init_and_personal": init_and_personal.run,
           "tracking_overhead": tracking_overhead.run, "poisoning": poisoning.run,
           "import_time": import_time.run, "fleet_scale": fleet_scale.run,
           "fleet_100k": fleet_scale.run_100k,
           "fleet_scale_pool": lambda: fleet_scale.run(fleet_scale.POOL),
           "fleet_100k_pool": lambda: fleet_scale.run_100k(fleet_scale.POOL), "secagg": secagg.run,
           "secagg_quality": secagg.run_quality, "secagg_stages": secagg.run_stages}


def main(names: list[str]) -> None:
    for name in names or list(BENCHES):
        if name not in BENCHES:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {sorted(BENCHES)}")
        rows = BENCHES[name]()
        save(name, rows)
        print(f"\n## {name}\n\n{table(rows)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
