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


def main(overrides: list[str]) -> int:
    from fl.tracking.model_init import resolve_init

    cfg = compose(overrides)
    validate(cfg)
    home = Path(os.environ.get("FLWR_HOME", REPO / ".flwr-home")).resolve()
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri.removeprefix('sqlite:///')).resolve()}"
    # Paths the apps resolve must not depend on the SuperNode's working directory.
    pinned = {"model.init": str(Path(resolve_init(cfg)).resolve()), "tracking.uri": uri,
              "devices.storage_dir": str(Path(cfg.devices.storage_dir).resolve())}
    for key in ("root", "controls_csv"):
        if cfg.data.get(key):
            pinned[f"data.{key}"] = str(Path(cfg.data[key]).resolve())
    run_overrides = [o for o in overrides if o.split("=", 1)[0] not in pinned]
    run_overrides += [f"{key}={value}" for key, value in pinned.items()]
    write_connection(home, cfg.fleet.num_devices, cfg.fleet.cpus_per_device)
    # Use this environment's Flower even when it is not activated: `flwr` starts
    # `flower-superlink` by name, so its directory goes first on PATH.
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, FLWR_HOME=str(home),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    joined = " ".join(run_overrides)  # one TOML string; the ServerApp splits it with shlex
    command = [str(bin_dir / "flwr"), "run", str(REPO), "--stream", "--run-config",
               f"overrides={joined!r}"]
    say(f"FLWR_HOME={home}\n$ {' '.join(shlex.quote(c) for c in command)}")
    try:
        return subprocess.run(command, env=env, check=False).returncode
    finally:
        stopped = stop_superlink(home)
        say(f"stopped local SuperLink (pid {', '.join(map(str, stopped)) or 'none running'})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
