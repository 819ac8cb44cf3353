"""Fleet throughput vs the same local training back to back (framework overhead).

Fleet: the default fleet through Flower's Simulation Engine (Ray, one worker per
core), training only (no evaluation panel, no new-user check), device updates per
second over the rounds. Back to back: the same ClientApp ``train`` called in this
process, one device after another, on real Flower messages and contexts.

The overhead ratio compares core-seconds per device update:
``(fleet seconds per update x workers) / (back-to-back seconds per update)``.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, Metadata, RecordDict

from clients.app import app as client_app
from fl import protocol as P
from fl.config import compose, fleet_spec, recipe, task_params
from fl.pretrain import load_checkpoint
from fl.privacy.plan import privacy_plan
from fl.tracking import keys as K
from fl.tracking.model_init import resolve_init

TRAIN_ONLY = ["fleet.eval_devices=0", "fleet.newuser_identities=0"]


def _fleet_rates(cfg, repeats: int) -> list[float]:
    from server.simulation import simulate

    rates = []
    for _ in range(repeats):
        history = simulate(cfg).history
        rounds = [history[r] for r in history if r > 0]
        updates = sum(m[K.DEVICES_TRAINED] for m in rounds)
        rates.append(updates / sum(m[K.ROUND_SECONDS] for m in rounds))
    return rates


def _back_to_back_seconds(cfg, updates: int) -> list[float]:
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(cfg.model.init)
    spec = fleet_spec(cfg)
    config = P.round_config(recipe(cfg, privacy_plan(cfg).photo), task_params(cfg), spec)
    config["server-round"] = 1
    rng = np.random.default_rng(0)
    contexts: dict[int, Context] = {}
    seconds = []
    for device in rng.choice(spec.num_devices, updates, replace=True):
        device = int(device)
        context = contexts.setdefault(device, Context(
            run_id=0, node_id=device, node_config={"partition-id": device},
            state=RecordDict(), run_config={}))
        content = RecordDict({P.ARRAYS: ArrayRecord(checkpoint["shared"]),
                              P.PERSONAL_INIT: ArrayRecord(checkpoint["personal_init"]),
                              P.CONFIG: config})
        # Outside a Flower run a Message needs its metadata spelt out.
        metadata = Metadata(run_id=0, message_id=f"bench-{len(seconds)}", src_node_id=0,
                            dst_node_id=device, reply_to_message_id="", group_id="",
                            created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
        message = Message(content=content, metadata=metadata)
        start = time.perf_counter()
        reply = client_app(message, context)
        seconds.append(time.perf_counter() - start)
        assert not reply.has_error(), reply.error
    return seconds


def run(rounds: int = 3, repeats: int = 3, overrides: list[str] | None = None) -> list[dict]:
    cfg = compose(TRAIN_ONLY + [f"fleet.rounds={rounds}"] + list(overrides or []))
    cfg.model.init = resolve_init(cfg)
    workers = max(1, int((os.cpu_count() or 1) // cfg.fleet.cpus_per_device))
    fleet_rate = statistics.median(_fleet_rates(cfg, repeats))
    per_update = _back_to_back_seconds(cfg, rounds * cfg.fleet.devices_per_round)
    b2b_seconds = statistics.median(per_update[1:])  # first call warms caches
    return [
        {"mode": f"fleet ({cfg.fleet.num_devices} devices, {workers} workers)",
         "updates_per_s": fleet_rate, "core_s_per_update": workers / fleet_rate},
        {"mode": "back to back (1 process, 1 thread)", "updates_per_s": 1 / b2b_seconds,
         "core_s_per_update": b2b_seconds},
        {"mode": "overhead ratio (core-s per update)", "updates_per_s": float("nan"),
         "core_s_per_update": (workers / fleet_rate) / b2b_seconds},
    ]
