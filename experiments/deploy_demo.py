"""A real deployment on localhost: TLS SuperLink, authenticated SuperNodes, ``flwr run``,
and a control API that only its operator can reach.

    python -m experiments.deploy_demo [hydra overrides]      (or: make deploy-demo)

Everything Flower's deployment engine needs, started and stopped by this command:

1. credentials (``fl.deploy.certs``): a CA, the SuperLink's certificate for
   localhost, and one EC key pair per SuperNode;
2. three devices, each with its own data directory (its owner's photos, written
   from SynthFaces, and a consent manifest granting them) and its own state
   directory (personal weights and photo-level ledger);
3. a SuperLink with TLS and SuperNode authentication on, bound to loopback only:
   its Control API (``flwr``) and Runtime API are the operator's; in front of it the
   fleet gateway (``fl.deploy.gateway``), the only port devices dial, which passes
   Flower's Fleet API and nothing else;
4. the three public keys registered with ``flwr supernode register`` (by the
   operator, on loopback), and three SuperNodes started against the gateway with
   ``--node-config "partition-id=<i> data-dir=<...> state-dir=<...>"``;
5. a stranger holding the CA certificate tries, through the gateway, to register a
   key, list runs and start a run: each must be refused, or the demo stops;
6. a short experiment (``data=device``) with ``flwr run`` against the SuperLink;
7. every process it started is stopped by process id, and the MLflow run printed.

Its working directory is ``.fedface-deploy/`` (``FEDFACE_DEPLOY_DIR`` to move it),
with the Flower homes (the operator's, the stranger's), logs and the devices'
directories. docs/deployment.md walks through the same steps on several machines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from experiments.flwr_local import REPO, flwr_env, flwr_run_command, run_overrides
from fl.config import compose
from fl.console import say
from fl.data import consent
from fl.data.export import export_folders
from fl.deploy.certs import make_ca, make_node_keys, make_server_cert
from fl.tracking import keys as K

CONNECTION = "fedface-demo"
EXPERIMENT = "fedface-deploy"
NUM_DEVICES = 3
DEMO_OVERRIDES = [
    "data=device", "privacy.noise=secure", "devices.consent_default=deny",
    f"fleet.num_devices={NUM_DEVICES}",
    f"fleet.devices_per_round={NUM_DEVICES}", "fleet.sampling=fixed", "fleet.rounds=2",
    f"fleet.eval_devices={NUM_DEVICES}", "fleet.round_timeout=120", "data.photos_min=10",
    "data.photos_max=20", "data.heldout_photos=2", f"tracking.experiment_name={EXPERIMENT}",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ANSI_COLOUR = re.compile(rb"\x1b\[[0-9;]*m")


def copy_stamped(stream, path: Path) -> None:
    """Copy a process's output to ``path`` line by line, each line prefixed with the
    wall-clock time it arrived (``HH:MM:SS.mmm``) and without Flower's colour codes."""
    with stream, path.open("wb") as log:
        for line in iter(stream.readline, b""):
            stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3].encode()
            log.write(stamp + b" " + ANSI_COLOUR.sub(b"", line))
            log.flush()


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


@dataclass
class Deployment:
    """The processes of a local deployment; ``stop()`` ends exactly these.

    The SuperLink listens on ``127.0.0.1:superlink_port`` only (Control, Runtime and
    Fleet API: the operator's); devices dial the fleet gateway on ``gateway_port``."""

    work: Path
    env: dict[str, str]
    superlink_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    copiers: dict[str, threading.Thread] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.work / "certs"

    @property
    def fleet_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        """A process in its own session (its children can be stopped with it), its
        output written to ``logs/<name>.log`` with the wall-clock time of each line
        (Flower's own lines carry none: the timestamps are what shows where a
        deployed round's time goes)."""
        # One thread per process unless told otherwise: several devices share this
        # machine's cores, and torch's default pool per process would oversubscribe them.
        env = {"OMP_NUM_THREADS": "1", **self.env, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=self.work, start_new_session=True)
        copier = threading.Thread(target=copy_stamped,
                                  args=(proc.stdout, self.work / "logs" / f"{name}.log"),
                                  daemon=True)
        copier.start()
        self.procs[name], self.copiers[name] = proc, copier
        return proc

    def wait(self, name: str, timeout: float) -> tuple[int, str]:
        """(exit code, whole log) of a process that ends by itself."""
        code = self.procs[name].wait(timeout)
        self.copiers[name].join(timeout)
        return code, (self.work / "logs" / f"{name}.log").read_text()

    def start_superlink(self) -> None:
        c = self.certs
        self.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(c / "ca.crt"),
            "--ssl-certfile", str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key"),
            "--enable-supernode-auth",
            # Loopback only: Flower serves Control, Runtime and Fleet on this one port.
            "--host", "127.0.0.1", "--port", str(self.superlink_port),
            # The apps run in this environment: no per-run installs (torch from an
            # unpinned resolver would be gigabytes of CUDA wheels).
            "--disable-runtime-dependency-installation",
            "--database", str(self.work / "superlink.db")])
        self.start_gateway()
        wait_for_port(self.superlink_port)
        wait_for_port(self.gateway_port)

    def start_gateway(self) -> None:
        """The fleet gateway: the devices' port, passing only Flower's Fleet API."""
        c = self.certs
        self.start("gateway", [
            sys.executable, "-m", "fl.deploy.gateway", "--host", "127.0.0.1",
            "--port", str(self.gateway_port), "--superlink", f"127.0.0.1:{self.superlink_port}",
            "--ssl-certfile", str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key"),
            "--ssl-ca-certfile", str(c / "ca.crt")])

    def register(self, *names: str) -> None:
        """The operator registers these SuperNodes' public keys, all at once (each
        ``flwr`` call is a CLI start of a few seconds)."""
        calls = {name: subprocess.Popen(
            ["flwr", "supernode", "register", str(self.certs / f"{name}.pub"), CONNECTION],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in names}
        for name, call in calls.items():
            output = call.communicate()[0]
            if call.returncode != 0:
                raise RuntimeError(f"registering {name} failed: {output}")

    def start_supernode(self, name: str, index: int, data_dir: Path, state_dir: Path,
                        key: str | None = None, ca: bool = True,
                        retries: int | None = None) -> subprocess.Popen:
        key = key or name
        command = ["flower-supernode", "--superlink", self.fleet_address,
                   "--auth-supernode-private-key", str(self.certs / f"{key}.key"),
                   "--node-config",
                   f'partition-id={index} data-dir="{data_dir}" state-dir="{state_dir}"',
                   "--host", "127.0.0.1", "--port", str(free_port())]
        if ca:
            command += ["--root-certificates", str(self.certs / "ca.crt")]
        if retries is not None:
            command += ["--max-retries", str(retries), "--max-wait-time", "30"]
        return self.start(name, command)

    def stop(self, name: str | None = None, grace: float = 10.0) -> list[int]:
        """Stop the named process (or all), with everything it started, by pid."""
        names = [name] if name else list(self.procs)
        stopped = []
        for n in names:
            proc = self.procs.pop(n)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if copier := self.copiers.pop(n, None):
                copier.join(grace)
            stopped.append(proc.pid)
        return stopped


STRANGER_ATTEMPTS = {  # what a stranger tries, and the Control API route it needs
    "register a node": ("/v1/control/register-node", ["supernode", "register", "{pub}"]),
    "list runs": ("/v1/control/list-runs", ["ls"]),
    "start a run": ("/v1/control/start-run", ["run", "{app}"]),
}
STRANGER_APP = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "takeover"
version = "1.0.0"
description = "what a stranger would run on every device"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "takeover:server"
clientapp = "takeover:client"

[tool.flwr.app.config]
"""


def stranger_attempts(deployment: Deployment) -> dict[str, subprocess.CompletedProcess]:
    """A party with the CA certificate (and a key pair of its own) but no login on the
    SuperLink host points ``flwr`` at the only port it can reach, the devices' one,
    and tries each of ``STRANGER_ATTEMPTS``. Its own FLWR_HOME; nothing left running."""
    home, name = deployment.work / "stranger-home", "stranger"
    make_node_keys(deployment.certs, name)
    write_connection(home, deployment.fleet_address, deployment.certs / "ca.crt", name)
    app = home / "takeover"  # any app will do; a small one is packed in a second
    app.mkdir()
    (app / "pyproject.toml").write_text(STRANGER_APP, encoding="utf-8")
    (app / "takeover.py").write_text("server = client = None  # never reaches a device\n",
                                     encoding="utf-8")
    env = dict(deployment.env, FLWR_HOME=str(home))
    results = {}
    for what, (_, args) in STRANGER_ATTEMPTS.items():
        args = [a.format(pub=deployment.certs / f"{name}.pub", app=app) for a in args]
        results[what] = subprocess.run(["flwr", *args, name], env=env, capture_output=True,
                                       text=True, timeout=120, check=False)
    return results


def cli_error(output: str) -> str:
    """The message of a ``flwr`` error panel, without its box and line wrapping."""
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())
    return flat.split(" Error ", 1)[1] if " Error " in flat else flat


def prepare(work: Path, photos: int = 14,
            num_devices: int = NUM_DEVICES) -> list[tuple[str, Path, Path]]:
    """Credentials, Flower connection, and each device's own data and state dirs."""
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    certs = work / "certs"
    make_ca(certs)
    make_server_cert(certs, ["localhost", "127.0.0.1"])
    export = export_folders(work / "export", people=num_devices, photos=photos)
    devices = []
    for i in range(num_devices):
        name = f"device-{i:05d}"
        make_node_keys(certs, name)
        data_dir, state_dir = work / "devices" / name / "data", work / "devices" / name / "state"
        shutil.copytree(export / f"Person_{i:04d}", data_dir)
        manifest = consent.Manifest()
        manifest.grant(sorted(p.name for p in data_dir.iterdir()), now=datetime.now(UTC))
        consent.write_manifest(data_dir, manifest)  # the owner consents to all their photos
        devices.append((name, data_dir, state_dir))
    shutil.rmtree(export)
    make_node_keys(certs, "unregistered")
    return devices


def write_connection(home: Path, address: str, ca: Path, name: str = CONNECTION) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "{address}"\nroot-certificates = "{ca}"\n', encoding="utf-8")


def main(overrides: list[str]) -> int:
    work = Path(os.environ.get("FEDFACE_DEPLOY_DIR", REPO / ".fedface-deploy")).resolve()
    pinned = run_overrides([*DEMO_OVERRIDES, f"checkpoint.dir={work / 'checkpoints'}",
                            *overrides])
    # One SuperNode per device of the fleet (fleet.num_devices may be overridden).
    devices = prepare(work, num_devices=int(compose(pinned).fleet.num_devices))
    home = work / "flwr-home"
    env = flwr_env(home)
    # The attribute net that scores evaluations (fl.attributes) is deterministic: the
    # demo's processes share the repository's cache rather than train it in the fresh
    # working directory every time.
    env.setdefault("FEDFACE_CACHE", str(REPO / ".fedface-cache"))
    deployment = Deployment(work, env)
    write_connection(home, f"127.0.0.1:{deployment.superlink_port}",
                     deployment.certs / "ca.crt")
    try:
        deployment.start_superlink()
        deployment.register(*(name for name, _, _ in devices))
        for i, (name, data_dir, state_dir) in enumerate(devices):
            deployment.start_supernode(name, i, data_dir, state_dir)
        say(f"SuperLink (TLS, SuperNode authentication) on 127.0.0.1:"
            f"{deployment.superlink_port} only; fleet gateway for devices on "
            f"{deployment.fleet_address}; {len(devices)} SuperNodes; logs in {work / 'logs'}")
        for what, done in stranger_attempts(deployment).items():
            if done.returncode == 0:
                raise RuntimeError(f"a stranger could {what} through the fleet port: "
                                   f"{done.stdout}")
            say(f"a stranger with ca.crt, via the fleet port, tried to {what}: "
                f"{cli_error(done.stdout + done.stderr)}")
        started = time.time()
        code = subprocess.run(flwr_run_command(CONNECTION, pinned), env=deployment.env,
                              cwd=REPO, check=False).returncode
        run_seconds = time.time() - started
    finally:
        stopped = deployment.stop()
        say(f"stopped {len(stopped)} processes (pids {', '.join(map(str, stopped))})")
    uri = next(o.split("=", 1)[1] for o in pinned if o.startswith("tracking.uri="))
    say(latest_run(uri, EXPERIMENT))
    say(round_times(uri, EXPERIMENT, run_seconds))
    return code


def _newest_run(uri: str, experiment_name: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"],
                              max_results=1) if experiment else []
    return client, (runs[0] if runs else None)


def latest_run(uri: str, experiment_name: str) -> str:
    """Where to look: the newest MLflow run of the demo's experiment."""
    _, run = _newest_run(uri, experiment_name)
    if run is None:
        return f"no MLflow run in experiment {experiment_name!r} at {uri}; see the logs above"
    return (f"MLflow run {run.info.run_id} ({run.info.status}) in experiment "
            f"{experiment_name!r}: mlflow ui --backend-store-uri {uri}")


def round_times(uri: str, experiment_name: str, run_seconds: float) -> str:
    """What a deployed round costs: each round's wall time (``fleet/round_seconds``:
    training, release, evaluation) with the devices that trained in it, and the whole
    ``flwr run`` (the ServerApp's start, the roll call and round 0 included)."""
    client, run = _newest_run(uri, experiment_name)
    rounds = {m.step: m.value for m in client.get_metric_history(
        run.info.run_id, K.ROUND_SECONDS)} if run else {}
    trained = {m.step: int(m.value) for m in client.get_metric_history(
        run.info.run_id, K.DEVICES_TRAINED)} if run else {}
    parts = [f"round {r} {seconds:.1f} s ({trained.get(r, 0)} trained)"
             for r, seconds in sorted(rounds.items()) if r > 0]
    return (f"deployed rounds: {', '.join(parts) or 'none logged'}; flwr run "
            f"{run_seconds:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
