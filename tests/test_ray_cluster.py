"""fleet.ray_address: a simulation joins a running two-node Ray cluster.

The test starts its own cluster on this machine, a head and a worker node of one
CPU each (``ray start --head --block``, ``ray start --address --block``), each in
a new session with its own temporary directory, so that it can stop exactly what
it started (its process groups, by id) and never touches another Ray instance
(``ray stop`` would stop every Ray on the machine). The simulation connects with
``ray.init(address=...)`` through Flower's backend config; Flower sizes its actor
pool from the cluster's resources, so two devices of one CPU each need both nodes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from fl.config import compose
from server.simulation import ray_backend_config, simulate

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT = 120  # seconds; a node starts in a few seconds on an idle machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--num-cpus=1", "--num-gpus=0", "--block",
                             "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _session_processes(sessions: list[int]) -> list[int]:
    """Processes still in the sessions this test started (Linux /proc)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) in sessions:
            left.append(int(pid))
    return left


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each process group this test started, then SIGKILL what is left."""
    sessions = [p.pid for p in procs]
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while _session_processes(sessions) and time.time() < deadline:
        time.sleep(0.5)
    for pid in _session_processes(sessions):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait(timeout=10)


def _wait_for_nodes(address: str, count: int, procs: list[subprocess.Popen]) -> None:
    import ray

    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a Ray node exited while starting")
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) >= count:
                return
        except ConnectionError:
            pass
        finally:
            ray.shutdown()
        time.sleep(1)
    raise TimeoutError(f"the Ray cluster did not reach {count} nodes in {START_TIMEOUT}s")


@pytest.fixture()
def two_node_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = [_start(["--head", f"--port={port}", f"--temp-dir={temp_dir}",
                     "--include-dashboard=false", f"--ray-client-server-port={_free_port()}"])]
    try:
        _wait_for_nodes(address, 1, procs)
        procs.append(_start([f"--address={address}"]))
        _wait_for_nodes(address, 2, procs)
        yield address, Path(temp_dir)
    finally:
        _stop(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert _session_processes([p.pid for p in procs]) == []


def test_the_backend_config_passes_gpu_shares_and_the_cluster_address():
    cfg = compose(["fleet.gpus_per_device=0.25", "fleet.ray_address=10.0.0.1:6379"])
    backend = ray_backend_config(cfg)
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert backend["init_args"]["address"] == "10.0.0.1:6379"
    assert "address" not in ray_backend_config(compose())["init_args"]  # a private Ray


def test_a_simulation_runs_on_an_existing_two_node_ray_cluster(two_node_cluster,
                                                              tiny_overrides, tmp_path,
                                                              monkeypatch):
    address, temp_dir = two_node_cluster
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in tiny_overrides if not o.startswith(
        ("fleet.num_devices", "fleet.devices_per_round", "fleet.rounds", "fleet.eval_devices",
         "fleet.newuser"))]
    cfg = compose([*overrides, "fleet.num_devices=2", "fleet.devices_per_round=2",
                   "fleet.sampling=fixed", "fleet.rounds=1", "fleet.eval_devices=0",
                   "fleet.newuser_identities=0", "tracking.samples_every=0",
                   f"tracking.uri={uri}", f"fleet.ray_address={address}"])
    drivers_before = set(temp_dir.glob("session_*/logs/python-core-driver-*"))
    summary = simulate(cfg)
    client = mlflow.MlflowClient(uri)
    assert client.get_run(summary.run_id).info.status == "FINISHED"
    # The run's driver joined this cluster (its log is in the cluster's session),
    # rather than starting a Ray of its own.
    drivers = set(temp_dir.glob("session_*/logs/python-core-driver-*")) - drivers_before
    assert drivers, "the simulation did not connect to the cluster"
    trained = client.get_metric_history(summary.run_id, "fleet/devices_trained")
    assert trained and trained[-1].value == 2
