"""What a deployed device pays before any work: importing the ClientApp.

In a deployment Flower starts a new ClientApp process for every message, so
``import clients.app`` is paid once per message. It is compared with the floor a
device cannot do without, ``import flwr.clientapp, torch, opacus``. The row
without Opacus says what a device path free of Opacus could gain (any Opacus
submodule runs ``opacus/__init__``, which loads the PrivacyEngine and every
accountant, so there is no lighter partial import). The last row times only what
``clients.app`` adds once the floor is loaded: a small difference of two large,
noisy numbers, measured directly.

Each run is a fresh interpreter: seconds to import, the process's wall time, its
CPU time (user + system, which moves less than wall time on a shared machine) and
its peak RSS (VmHWM: ``ru_maxrss`` would include the parent's RSS from before
the exec, on Linux). Rows are interleaved so that load from other processes hits each
alike, after one warm-up each (bytecode and file cache). Medians of 5 and the
spread (max - min).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

FLOOR = "import flwr.clientapp, torch, opacus"
# name: (imported before the clock starts, imported on the clock)
ROWS = {
    "clients.app": ("", "import clients.app"),
    "floor: flwr.clientapp, torch, opacus": ("", FLOOR),
    "flwr.clientapp, torch (no opacus)": ("", "import flwr.clientapp, torch"),
    "clients.app after the floor": (FLOOR, "import clients.app"),
}

_CHILD = """\
import json, resource, time
{setup}
start = time.perf_counter()
{statement}
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"import_s": seconds, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mb": int(hwm.split()[1]) / 1024}}))
"""


def measure(setup: str, statement: str) -> dict:
    """One fresh interpreter: seconds to import, CPU and wall seconds, peak RSS in MB."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD.format(setup=setup, statement=statement)],
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": wall}


def run(repeats: int = 5) -> list[dict]:
    for setup, statement in ROWS.values():
        measure(setup, statement)  # warm-up: bytecode and file cache
    samples: dict[str, list[dict]] = {name: [] for name in ROWS}
    for _ in range(repeats):
        for name, (setup, statement) in ROWS.items():
            samples[name].append(measure(setup, statement))
    rows = []
    for name, runs in samples.items():
        row = {"import": name, "repeats": repeats}
        for key in ("import_s", "cpu_s", "wall_s", "peak_rss_mb"):
            values = [r[key] for r in runs]
            row[key] = statistics.median(values)
            row[f"{key}_spread"] = max(values) - min(values)
        rows.append(row)
    floor = rows[1]
    for row in rows:
        row["wall_vs_floor"] = row["wall_s"] / floor["wall_s"]
        row["cpu_vs_floor"] = row["cpu_s"] / floor["cpu_s"]
        row["rss_vs_floor"] = row["peak_rss_mb"] / floor["peak_rss_mb"]
    return rows


if __name__ == "__main__":
    from experiments.bench.common import table

    print(table(run()))
