"""Start-up and memory against the fleet's size, measured from outside the run.

Each row launches ``python -m experiments.train`` as its own process (training
only: no evaluation panel, no new-user check, no sample grids), reads its console
for the round lines, and samples the memory of its whole process tree (the
ServerApp, Ray's GCS and raylet, every Ray worker) twice a second:

* ``launch_to_round1_s``: from launching the process to its "round 1" line;
* ``total_s``: to the process's exit (rounds, privacy review, model logging);
* ``peak_rss_gib``: the largest sum of RSS over the tree (shared pages, e.g.
  torch's libraries, count once per process: an upper bound);
* ``peak_pss_gib``: the same with PSS (each shared page split between the
  processes that map it: what the tree really holds);
* ``trained``: each round's "trained n/k" (devices that replied with an update, of
  those sent one): a run whose devices all errored measures no training.

The pretrained model (a short pretraining: ``SHORT_PRETRAIN``) is cached before
the clock starts, as a second run finds it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fl.config import compose
from fl.tracking.model_init import resolve_init

TRAIN_ONLY = ["fleet.eval_devices=0", "fleet.newuser_identities=0", "tracking.samples_every=0"]
# Start-up and memory do not depend on how well the model was pretrained: a short
# pretraining (cached once) keeps the bench from waiting on the full one.
SHORT_PRETRAIN = ["pretrain.steps=20"]
SAMPLE_EVERY = 0.5  # seconds between memory samples


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _tree(root: int) -> list[int]:
    tree, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += tree.get(pid, [])
    return found


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) if it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if ":" in line}
    return values.get("Rss", 0), values.get("Pss", 0)


class EngineDidNotStart(RuntimeError):
    """Ray gives its raylet 30 s to register; on a loaded machine it may not."""


def measure(num_devices: int, devices_per_round: int, rounds: int,
            overrides: list[str] = (), timeout: float = 1800.0, tries: int = 3) -> dict:
    """One launch (again if Ray did not start: the engine's start is not what is
    measured); its timings and peak memory (see the module doc)."""
    for attempt in range(tries):
        try:
            return _launch(num_devices, devices_per_round, rounds, overrides, timeout)
        except EngineDidNotStart:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _launch(num_devices: int, devices_per_round: int, rounds: int, overrides: list[str],
            timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedface-scale-") as tmp:
        args = [*TRAIN_ONLY, *SHORT_PRETRAIN, f"fleet.num_devices={num_devices}",
                f"fleet.devices_per_round={devices_per_round}", f"fleet.rounds={rounds}",
                f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"devices.storage_dir={tmp}/devices",
                f"checkpoint.dir={tmp}/checkpoints", f"hydra.run.dir={tmp}/hydra", *overrides]
        resolve_init(compose([a for a in args if not a.startswith("hydra.")]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "experiments.train", *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env, cwd=os.getcwd())
        rounds_at: dict[int, float] = {}
        trained: dict[int, str] = {}
        lines: list[str] = []
        crashes: list[str] = []

        def read() -> None:
            for line in process.stdout:
                lines.append(line)
                if "Simulation Runtime crashed" in line:
                    crashes.append(line)
                words = line.split()
                if len(words) > 1 and words[0] == "round" and "/" in words[1]:
                    rnd = int(words[1].split("/")[0])
                    rounds_at[rnd] = time.perf_counter() - start
                    if "trained" in words:  # "round 1/2  trained 9/10 ...": replies, not errors
                        trained[rnd] = words[words.index("trained") + 1]

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        peak_rss = peak_pss = processes = 0
        crashed = False
        while process.poll() is None:
            pids = _tree(process.pid)
            crashed = bool(crashes)
            if crashed or time.perf_counter() - start > timeout:
                for pid in reversed(pids):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            rss, pss = map(sum, zip(*(_memory_kib(p) for p in pids), strict=True))
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            processes = max(processes, len(pids))
            time.sleep(SAMPLE_EVERY)
        total = time.perf_counter() - start
        process.wait()
        reader.join(timeout=5)
        if crashed:
            raise EngineDidNotStart("".join(lines[-30:]))
        if process.returncode != 0 or 1 not in rounds_at:
            raise RuntimeError(f"the run of {num_devices} devices failed "
                               f"(exit {process.returncode}):\n" + "".join(lines[-30:]))
    return {"devices": num_devices, "per_round": devices_per_round, "rounds": rounds,
            "launch_to_round0_s": rounds_at.get(0, float("nan")),
            "launch_to_round1_s": rounds_at[1], "total_s": total,
            "peak_rss_gib": peak_rss / 2**20, "peak_pss_gib": peak_pss / 2**20,
            "processes": processes,
            "trained": " ".join(f"r{r}: {t}" for r, t in sorted(trained.items()))}


def run(overrides: list[str] = ()) -> list[dict]:
    """Start-up at 100 and 10,000 devices (10 a round, 1 round)."""
    rows = [measure(n, 10, 1, overrides) for n in (100, 10_000)]
    ratio = {key: float("nan") for key in rows[0]} | {
        "devices": "10,000 / 100", "per_round": "", "rounds": "", "processes": "", "trained": "",
        "launch_to_round1_s": rows[1]["launch_to_round1_s"] / rows[0]["launch_to_round1_s"]}
    return [*rows, ratio]


def run_100k(overrides: list[str] = ()) -> list[dict]:
    """100,000 devices, 100 a round, 2 rounds: time and peak memory of every process."""
    return [measure(100_000, 100, 2, overrides)]


POOL = ["fleet.backend=pool"]
