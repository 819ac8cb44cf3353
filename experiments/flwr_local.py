"""``flwr run .`` on a local SuperLink that this command starts *and stops*.

    python -m experiments.flwr_local [hydra overrides]

Flower's default local connection starts a background SuperLink that outlives
``flwr run`` (under ``$FLWR_HOME``). This wrapper gives it a FLWR_HOME of its own
(``.flwr-home`` unless ``FLWR_HOME`` is set), sizes the simulated fleet from the
Hydra config, pretrains in this process (so the ServerApp finds the checkpoint),
passes absolute paths for the checkpoint and MLflow store, and afterwards stops
exactly the SuperLink it started, by process id.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from fl.config import compose, validate
from fl.console import say
from fl.tracking.mlflow_run import tracking_uri

REPO = Path(__file__).resolve().parent.parent


def write_connection(home: Path, num_devices: int, cpus_per_device: float) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n'
        '[superlink.local]\naddress = ":local:"\n'
        f"options.num-supernodes = {num_devices}\n"
        f"options.backend.client-resources.num-cpus = {cpus_per_device}\n"
        "options.backend.client-resources.num-gpus = 0.0\n",
        encoding="utf-8")


def superlink_pids(home: Path) -> list[int]:
    """Processes running ``flower-superlink`` with state under ``home``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(home) in cmdline:
            pids.append(int(proc.name))
    return pids


def stop_superlink(home: Path, grace: float = 10.0) -> list[int]:
    pids = superlink_pids(home)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    return pids


def run_overrides(overrides: list[str]) -> list[str]:
    """The Hydra overrides for a ServerApp started by ``flwr run``: validated, with
    the pretraining done here (so the ServerApp finds the checkpoint) and every
    path the apps resolve made absolute (their working directory is Flower's)."""
    from fl.tracking.model_init import resolve_init

    cfg = compose(overrides)
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri.removeprefix('sqlite:///')).resolve()}"
    pinned = {"tracking.uri": uri, "checkpoint.dir": str(Path(cfg.checkpoint.dir).resolve())}
    if not cfg.resume:  # a resumed run's saved configuration already holds its paths
        validate(cfg)
        pinned |= {"model.init": str(Path(resolve_init(cfg)).resolve()),
                   "devices.storage_dir": str(Path(cfg.devices.storage_dir).resolve())}
        for key in ("root", "controls_csv"):
            if cfg.data.get(key):
                pinned[f"data.{key}"] = str(Path(cfg.data[key]).resolve())
    kept = [o for o in overrides if o.split("=", 1)[0] not in pinned]
    return kept + [f"{key}={value}" for key, value in pinned.items()]


def flwr_env(home: Path) -> dict[str, str]:
    """This environment's Flower even when it is not activated: ``flwr`` and the
    SuperLink start Flower's other executables by name, so its bin goes first on PATH."""
    bin_dir = Path(sys.executable).parent
    return dict(os.environ, FLWR_HOME=str(home),
                PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def flwr_run_command(connection: str | None, overrides: list[str]) -> list[str]:
    joined = " ".join(overrides)  # one TOML string; the ServerApp splits it with shlex
    return [str(Path(sys.executable).parent / "flwr"), "run", str(REPO),
            *([connection] if connection else []), "--stream", "--run-config",
            f"overrides={joined!r}"]


def main(overrides: list[str]) -> int:
    home = Path(os.environ.get("FLWR_HOME", REPO / ".flwr-home")).resolve()
    pinned = run_overrides(overrides)
    cfg = compose(pinned)
    validate(cfg)  # sizes an on-disk fleet
    write_connection(home, cfg.fleet.num_devices, cfg.fleet.cpus_per_device)
    env = flwr_env(home)
    command = flwr_run_command(None, pinned)
    say(f"FLWR_HOME={home}\n$ {' '.join(shlex.quote(c) for c in command)}")
    try:
        return subprocess.run(command, env=env, check=False).returncode
    finally:
        stopped = stop_superlink(home)
        say(f"stopped local SuperLink (pid {', '.join(map(str, stopped)) or 'none running'})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
