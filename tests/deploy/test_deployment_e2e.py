"""A real deployment on localhost: TLS SuperLink with SuperNode authentication bound
to loopback, the fleet gateway in front of it, four registered SuperNodes over their
own data and state directories, ``flwr run`` with secure aggregation (SecAgg+).

One deployment serves every check (each SuperNode start costs seconds): the run
completes with the same MLflow keys as a simulation of the same photos with the same
flags; while it trains, a stranger holding the CA certificate tries to register a
node, list runs and start a run through the only port devices dial, and is refused by
the gateway (the operator, on loopback, lists the run); a SuperNode with an
unregistered key and one without the CA certificate are refused; a SuperNode killed
after it shared its keys is counted in ``fleet/devices_failed``, and the others' shares
unmask the round's sum without it; the photo-level ledgers are on the devices' disks;
nothing is left running. One round: every deployed exchange starts a ClientApp process
per device (docs/deployment.md), and SecAgg+ has four of them per round.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from cryptography.hazmat.primitives import serialization

from clients.device_state import DeviceStore
from experiments.deploy_demo import (
    CONNECTION,
    DEMO_OVERRIDES,
    EXPERIMENT,
    STRANGER_ATTEMPTS,
    Deployment,
    cli_error,
    prepare,
    round_times,
    stranger_attempts,
    write_connection,
)
from experiments.flwr_local import flwr_env, flwr_run_command, run_overrides
from fl.config import compose
from fl.deploy.gateway import REFUSED
from fl.tracking import keys as K
from server.simulation import simulate
from tests.tiny import TINY_PHASES

pytestmark = pytest.mark.slow
# The one deployment runs SecAgg+ (plain aggregation is covered by the simulations).
# A sum is unmasked only over at least aggregation.min_survivors=3 devices (devices
# refuse fewer), and a cohort of 3 needs all 3 shares: one of 3 dropping out could
# only abandon the round. With 4 (3 of 4 shares), killing one mid-round exercises the
# protocol's dropout recovery. One device evaluates (the path and the metric keys are
# those of any panel; each panel device costs a ClientApp process per round).
DEVICES = 4
FLEET = ["aggregation.secure=true", f"fleet.num_devices={DEVICES}",
         f"fleet.devices_per_round={DEVICES}", "fleet.eval_devices=1", "fleet.rounds=1"]
TINY = ["task.width=8", "pretrain.steps=5", "pretrain.batch_size=4", "data.num_public=8",
        "data.clip_length=3", "task.eval_clips=1", "fleet.newuser_identities=1",
        "fleet.newuser_steps=3", *TINY_PHASES, "local.batch_size=4",
        "privacy.photo.delta=1e-3", "privacy.user.delta=1e-2"]


def _metric_steps(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* write them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def _probe_runtime(deployment: Deployment) -> tuple[int, str]:
    """The ServerApp's Runtime API (unauthenticated in Flower's subprocess isolation)."""
    reply = httpx.post(f"https://{deployment.fleet_address}/v1/runtime/acquire-task",
                       content=b"", headers={"content-type": "application/protobuf"},
                       verify=str(deployment.certs / "ca.crt"))
    return reply.status_code, reply.text


def _fleet_register(deployment: Deployment, key: str) -> tuple[int, str]:
    """Self-registration of a new key on the Fleet API, which the gateway passes."""
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private = serialization.load_ssh_private_key(
        (deployment.certs / f"{key}.key").read_bytes(), None)
    client = FleetHttpClient.from_server_address(
        deployment.fleet_address, insecure=False,
        root_certificates=str(deployment.certs / "ca.crt"),
        interceptors=[NodeAuthHttpInterceptor(private, private.public_key())])
    try:
        client.RegisterNode(RegisterNodeFleetRequest(
            public_key=public_key_to_bytes(private.public_key())))
    except httpx.HTTPStatusError as err:
        return err.response.status_code, err.response.text
    return 200, "registered"


@pytest.fixture(scope="module")
def deployment_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    devices = prepare(work / "fleet", num_devices=DEVICES)
    home = work / "flwr-home"
    # fleet.round_timeout stays the demo's 120 s: a device that stops is reported by
    # the SuperLink at once (its SuperNode signs off), so the limit costs nothing here,
    # while a loaded machine took over 60 s for a training message (round 1 lost devices).
    overrides = run_overrides([*DEMO_OVERRIDES, *TINY, *FLEET,
                               f"tracking.uri={uri}",
                               f"pretrain.cache_dir={work / 'cache'}",
                               f"checkpoint.dir={work / 'checkpoints'}"])
    deployment = Deployment(work / "fleet", flwr_env(home))
    write_connection(home, f"127.0.0.1:{deployment.superlink_port}",
                     deployment.certs / "ca.crt")
    result = {"devices": devices, "uri": uri}
    try:
        deployment.start_superlink()
        deployment.register(*(name for name, _, _ in devices))
        for i, (name, data_dir, state_dir) in enumerate(devices):
            deployment.start_supernode(name, i, data_dir, state_dir)
        _, data_dir, state_dir = devices[0]
        deployment.start_supernode("rogue", 9, data_dir, work / "rogue-state",
                                   key="unregistered", retries=1)
        deployment.start_supernode("no-ca", 8, data_dir, work / "no-ca-state",
                                   key=devices[1][0], ca=False, retries=1)
        run = deployment.start("flwr-run", flwr_run_command(CONNECTION, overrides))
        # While the devices train: what a stranger can do from the devices' side, and
        # what the operator can do on loopback.
        result["stranger"] = stranger_attempts(deployment)
        result["runtime"] = _probe_runtime(deployment)
        result["fleet_register"] = _fleet_register(deployment, "stranger")
        result["listening"] = {"superlink": _listening(deployment.superlink_port),
                               "gateway": _listening(deployment.gateway_port)}
        result["operator_ls"] = subprocess.run(["flwr", "ls", CONNECTION], env=deployment.env,
                                               capture_output=True, text=True, check=False)
        # Kill device 2's SuperNode as the training message reaches it (its ClientApp
        # takes seconds to start): it has answered the key set-up and sent its shares,
        # so SecAgg+ must remove its masks through the others' shares.
        victim, deadline = deployment.work / "logs" / f"{devices[2][0]}.log", time.time() + 600
        while time.time() < deadline and run.poll() is None:
            if "Receiving: train message" in victim.read_text():
                result["killed"] = deployment.stop(devices[2][0])
                break
            time.sleep(0.2)
        result["code"], result["output"] = deployment.wait("flwr-run", 600)
        result["rogue"] = deployment.wait("rogue", 120)
        result["no_ca"] = deployment.wait("no-ca", 120)
    finally:
        result["stopped"] = deployment.stop()
        logs = work / "fleet" / "logs"
        result["gateway_log"] = (logs / "gateway.log").read_text()
        result["device_logs"] = {name: (logs / f"{name}.log").read_text()
                                 for name, _, _ in devices}
    return result


def test_the_deployed_run_completes_with_the_simulation_metric_keys(deployment_run, tmp_path):
    r = deployment_run
    assert r["code"] == 0, r["output"][-4000:]
    client = mlflow.MlflowClient(r["uri"])
    experiment = client.get_experiment_by_name("fedface-deploy")
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.info.status == "FINISHED"
    # the same photos, simulated: the same metric keys
    root = tmp_path / "same-photos"
    for name, data_dir, _ in r["devices"]:
        (root / name).mkdir(parents=True)
        for photo in data_dir.glob("*.jpg"):
            (root / name / photo.name).write_bytes(photo.read_bytes())
    sim_uri = f"sqlite:///{tmp_path / 'sim.db'}"
    overrides = [o for o in DEMO_OVERRIDES if not o.startswith(("data=", "devices."))]
    summary = simulate(compose([*overrides, *TINY, *FLEET, "data=folders", f"data.root={root}",
                                "devices.consent_default=grant",
                                f"tracking.uri={sim_uri}", f"devices.storage_dir={tmp_path}",
                                f"pretrain.cache_dir={tmp_path / 'cache'}",
                                f"checkpoint.dir={tmp_path / 'checkpoints'}"]))
    simulated = mlflow.MlflowClient(sim_uri).get_run(summary.run_id).data.metrics
    assert set(run.data.metrics) == set(simulated)
    assert _metric_steps(client, run.info.run_id, K.DEVICES_TRAINED) == {1: DEVICES - 1}
    # what make deploy-demo prints at the end: each round's wall time
    times = round_times(r["uri"], EXPERIMENT, 0.0)
    assert times.startswith("deployed rounds: round 1 ") and f"s ({DEVICES - 1} trained)" \
        in times, times


def test_a_stranger_with_the_ca_certificate_cannot_steer_the_deployment(deployment_run):
    r = deployment_run
    # The SuperLink (Control, Runtime and Fleet API on one port) listens on loopback
    # only; the devices' port is the gateway's.
    assert r["listening"]["superlink"] == {"0100007F"}
    assert r["listening"]["gateway"]
    for what, (route, _) in STRANGER_ATTEMPTS.items():
        done = r["stranger"][what]
        output = cli_error(done.stdout + done.stderr)
        assert done.returncode != 0, f"a stranger could {what}: {output}"
        # refused by the gateway, for this route, not by a broken command or connection
        assert output == f"{REFUSED}: POST {route} is not served here", output
        assert f"refused POST '{route}'" in r["gateway_log"]
    status, text = r["runtime"]
    assert status == 404 and REFUSED in text
    # The Fleet API is passed, but SuperNode authentication refuses self-registration.
    status, text = r["fleet_register"]
    assert status == 412 and "must be registered via the CLI" in text
    # The operator, on loopback, lists the run the stranger could not see.
    ls = r["operator_ls"]
    assert ls.returncode == 0 and "fedface" in ls.stdout, ls.stdout + ls.stderr


def test_unregistered_supernodes_and_clients_without_the_ca_are_refused(deployment_run):
    code, log = deployment_run["rogue"]
    assert code != 0 and "Failed to activate SuperNode" in log
    code, log = deployment_run["no_ca"]
    assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in log


def test_a_device_dropping_out_after_sharing_its_keys_is_recovered(deployment_run):
    r = deployment_run
    assert r.get("killed"), "device 2 was never stopped"
    client = mlflow.MlflowClient(r["uri"])
    run = client.search_runs([client.get_experiment_by_name("fedface-deploy").experiment_id])[0]
    failed = _metric_steps(client, run.info.run_id, K.DEVICES_FAILED)
    trained = _metric_steps(client, run.info.run_id, K.DEVICES_TRAINED)
    assert failed == {1: 1} and trained == {1: DEVICES - 1}
    # Secure aggregation ran and finished the round (the metric exists only under it):
    # the sum was unmasked without the killed device's masked update.
    assert _metric_steps(client, run.info.run_id, K.SECAGG_ABANDONED) == {1: 0.0}
    logs = r["device_logs"]
    victim = logs.pop("device-00002")
    # it set up and shared its keys, and never answered the training message
    assert victim.count("Sending: query.secagg_setup message") == 1
    assert victim.count("Sending: query.secagg_share_keys message") == 1
    assert "Receiving: train message" in victim and "Sending: train message" not in victim
    for name, log in logs.items():  # the survivors' shares unmasked the sum
        assert log.count("Sending: query.secagg_unmask message") == 1, (name, log[-3000:])


def test_ledgers_live_on_the_devices_disks_and_nothing_is_left_running(deployment_run):
    for name, _, state_dir in deployment_run["devices"]:
        store = DeviceStore(state_dir, run="a later run")
        ledger = store.ledger()
        if name == "device-00002":  # killed before it trained: none of its photos spent
            assert ledger is None
            continue
        assert ledger["participations"] == 1 and sum(ledger["steps"]) > 0
        assert store.personal(before_round=2) is not None
    for pid in deployment_run["stopped"]:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
