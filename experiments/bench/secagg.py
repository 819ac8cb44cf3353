"""Secure aggregation's cost: ``python -m experiments.bench secagg`` (the round's
overhead against plain aggregation and the bytes per device, at 10 and 100 devices
per round), ``secagg_quality`` (the default experiment with and without
``aggregation.secure``) and ``secagg_stages`` (the same cut to 4 rounds, each
exchange of a round timed: the end-to-end overhead in a simulation).

``secagg``: one round in one process over the real code paths, secure and plain
over the same devices and updates: the server's stages of
``server.secure_aggregation`` (or ``server.aggregation.PlainAggregation``), the
device handlers of ``clients.secagg`` with real keys, shares, masks and Flower
messages (``experiments.bench.secagg_fleet``; a stand-in for DP-SGD, which costs
the same either way), the default task's device-trained arrays and the shipped
``aggregation.*`` and ``privacy.user.*`` defaults (DP-FedAvg release). CPU seconds
(``process_time``), so other load on the machine does not inflate them. A round's
cost splits into the server's work and each device's; in a simulation on one
machine the devices' work is serialized over its cores, so the table also gives the
round's added time on 2 cores: (server + n * device) secure minus plain, the
devices' part over 2 cores. Bytes are Flower's serialized records (protobuf),
request and reply of every stage, per device.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from experiments.bench.secagg_fleet import FakeFleet, reports, train_messages
from fl import config as C
from fl import protocol as P
from fl.privacy.plan import user_plan
from fl.privacy.release import make_release
from fl.tasks import get_task
from fl.tracking import keys as K
from server.aggregation import make_aggregation
from server.transport import Transport


def _shared_weights(cfg) -> tuple[dict[str, torch.Tensor], list[str]]:
    task = get_task(C.task_params(cfg))
    shared = task.shared_state(task.build_model(int(cfg.data.image_size)))
    return shared, [k for k in shared if task.is_device_trained(k)]


def _size(content: RecordDict) -> int:
    return recorddict_to_proto(content).ByteSize()


class _Timed:
    """Wraps the device handlers' time and the bytes of every message and reply."""

    def __init__(self, fleet) -> None:
        self.fleet, self.device_seconds, self.bytes = fleet, 0.0, 0

    def push_messages(self, messages):
        messages = list(messages)
        self.bytes += sum(_size(m.content) for m in messages)
        start = time.process_time()
        ids = self.fleet.push_messages(messages)
        self.device_seconds += time.process_time() - start
        return ids

    def pull_messages(self, ids):
        got = self.fleet.pull_messages(ids)
        self.bytes += sum(_size(m.content) for m in got if not m.has_error())
        return got


def _config(cohort: int, num_shares: float | None):
    """The shipped defaults at this cohort (a fleet of 10 per device drawn)."""
    overrides = [f"fleet.devices_per_round={cohort}", f"fleet.num_devices={10 * cohort}"]
    if num_shares is not None:
        overrides.append(f"aggregation.num_shares={num_shares}")
    return C.compose(overrides)


def _plain_reports(replies) -> dict:
    out = {}
    for device, (report, reply) in reports(replies).items():
        arrays = reply.content[P.ARRAYS].to_torch_state_dict() if report.trained else None
        out[device] = (SimpleNamespace(trained=report.trained, arrays=arrays, examples=1.0),
                       reply)
    return out


def _one_round(cfg, secure: bool, shared, keys) -> dict[str, float]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    cohort = int(cfg.fleet.devices_per_round)
    g = torch.Generator().manual_seed(cohort)
    nodes = list(range(1000, 1000 + cohort))
    updates = {n: {k: torch.randn(shared[k].shape, generator=g) * 1e-3 for k in keys}
               for n in nodes}
    grid = _Timed(FakeFleet(updates))
    is_trained = keys.__contains__
    release = make_release(user_plan(cfg), None, is_trained, str(cfg.privacy.noise),
                           int(cfg.seed))
    a = cfg.aggregation
    agg = make_aggregation(secure, Transport(grid, ArrayRecord({}), 600.0, lambda *a: None),
                           release, float(a.num_shares), float(a.threshold),
                           lambda line: None, int(a.min_survivors))
    start = time.process_time()
    replies = agg.collect(1, train_messages(shared, nodes), {n: n for n in nodes})
    got = reports(replies) if secure else _plain_reports(replies)
    released = agg.release(1, shared, got)
    total = time.process_time() - start
    assert len(released.accepted) == cohort, released.rejected
    return {"server_s": total - grid.device_seconds,
            "device_s": grid.device_seconds / cohort,
            "bytes_per_device": grid.bytes / cohort,
            "shares": agg.round.params.num_shares if secure else 0,
            "threshold": agg.round.params.threshold if secure else 0}


# (devices per round, aggregation.num_shares or None for the default, repeats).
# 100 devices twice: the default full graph (every device a neighbour of every
# other) and SecAgg+'s sparse ring (num_shares=0.1: 10 neighbours).
ROWS = ((10, None, 5), (30, None, 3), (100, 0.1, 3), (100, None, 1))


def run(rows=ROWS) -> list[dict]:
    torch.set_num_threads(1)
    out = []
    for cohort, num_shares, times in rows:
        cfg = _config(cohort, num_shares)
        shared, keys = _shared_weights(cfg)
        d = sum(shared[k].numel() for k in keys)
        med = {}
        for secure in (False, True):
            runs = [_one_round(cfg, secure, shared, keys) for _ in range(times)]
            med[secure] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        sec, plain = med[True], med[False]
        cost = {s: m["server_s"] + cohort * m["device_s"] / 2 for s, m in med.items()}
        out.append({
            "devices_per_round": cohort, "summed_values": d,
            "neighbours": int(sec["shares"]), "threshold": int(sec["threshold"]),
            "secure_server_s": sec["server_s"], "secure_device_s": sec["device_s"],
            "plain_server_s": plain["server_s"], "plain_device_s": plain["device_s"],
            "added_2_cores_s": cost[True] - cost[False],
            "kB_per_device": sec["bytes_per_device"] / 1e3,
            "plain_kB_per_device": plain["bytes_per_device"] / 1e3,
            "repeats": times})
        print(out[-1], flush=True)  # a long row is not lost if a later one is stopped
    return out


# The default experiment (configs/config.yaml: 100 devices, 10 per round, 20 rounds,
# photo- and user-level DP, seeded noise). Sample grids off: they change no metric.
QUALITY_OVERRIDES: list[str] = ["tracking.samples_every=0"]


def _quality_arm(secure: bool, overrides: list[str]) -> dict[str, float]:
    """One run of the experiment with ``aggregation.secure`` set, in temp dirs."""
    import tempfile

    from server.simulation import simulate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.compose([*overrides, f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                         f"checkpoint.dir={tmp}/checkpoints",
                         f"devices.storage_dir={tmp}/devices",
                         f"aggregation.secure={str(secure).lower()}"])
        start = time.time()
        summary = simulate(cfg)
        wall = time.time() - start
    history = summary.history
    logged = sorted({k for metrics in history.values() for k in metrics
                     if k.startswith(("quality/", "privacy/"))})
    rounds = [m[K.ROUND_SECONDS] for r, m in history.items() if r > 0 and K.ROUND_SECONDS in m]
    return {**{k: summary.final(k) for k in logged},
            "rounds": float(len(rounds)), "median round s": statistics.median(rounds),
            "run wall s": wall,
            "rounds abandoned": sum(m.get(K.SECAGG_ABANDONED, 0.0) for m in history.values())}


def run_quality(overrides: list[str] | None = None) -> list[dict]:
    """The experiment with ``aggregation.secure=false`` and ``true``, same seed
    (seeded noise: the same DP-SGD and DP-FedAvg draws), side by side: every
    quality/* and privacy/* key's final value, and the round times."""
    overrides = QUALITY_OVERRIDES if overrides is None else overrides
    arms = {}
    for secure in (False, True):
        arms[secure] = _quality_arm(secure, overrides)
        print({"aggregation.secure": secure, **arms[secure]}, flush=True)
    keys = [k for k in arms[False] if k in arms[True]]
    return [{"key": k, "secure=false": arms[False][k], "secure=true": arms[True][k],
             "difference": arms[True][k] - arms[False][k]} for k in keys]


STAGES_OVERRIDES: list[str] = ["tracking.samples_every=0", "fleet.rounds=4"]


def run_stages(overrides: list[str] | None = None) -> list[dict]:
    """A secure round end to end against a plain one: the default experiment cut to
    4 rounds, plain then secure back to back, with the wall time of every exchange
    (each SecAgg stage, training, evaluation) and the median round."""
    from server import secure_aggregation
    from server.transport import Transport

    timings: list[tuple[str, int, float]] = []

    def timed(function):
        def wrapper(first, messages, *rest):  # exchange(transport, ...), send(self, ...)
            messages = list(messages)
            start = time.time()
            out = function(first, messages, *rest)
            kind = messages[0].metadata.message_type if messages else "-"
            timings.append((kind, len(messages), time.time() - start))
            return out
        return wrapper

    exchange, send = secure_aggregation.exchange, Transport.send
    secure_aggregation.exchange, Transport.send = timed(exchange), timed(send)
    arms = {}
    try:
        for secure in (False, True):
            timings.clear()
            arm = _quality_arm(secure, STAGES_OVERRIDES if overrides is None else overrides)
            arms[secure] = (arm["median round s"], list(timings))
            print(secure, arms[secure], flush=True)
    finally:
        secure_aggregation.exchange, Transport.send = exchange, send
    kinds = sorted({kind for _, timed_ in arms.values() for kind, _, _ in timed_})
    return [{"aggregation.secure": secure, "median round s": median_round}
            | {f"{kind} s": statistics.median([t for k, _, t in timed_ if k == kind]
                                              or [float("nan")]) for kind in kinds}
            for secure, (median_round, timed_) in arms.items()]
