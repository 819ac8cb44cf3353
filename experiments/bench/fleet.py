"""Fleet throughput against the same local training back to back and as pure compute.

Three ways to do the same device updates (the same devices, recipe and weights):

* **fleet**: the default fleet, training only (no evaluation panel, no new-user
  check), on each simulation backend (``fleet.backend``: Flower's Simulation
  Engine with Ray, one worker per core; fedface's process pool, ``server.pool``),
  device updates per second over the rounds after the first (round 1 waits for the
  workers to start and import torch: its seconds are a row of their own);
* **back to back**: the ClientApp's ``train`` called in this process, one device
  after another, on real Flower messages and contexts (it opens the device,
  builds the model, loads and saves the device's state);
* **pure compute**: only ``clients.trainer.train_on_device`` (DP-SGD with Opacus'
  ``make_private``), on models built and photos loaded beforehand, without
  Flower, storage or messages.

Ratios compare core-seconds per device update:
``(fleet seconds per update x workers) / (pure compute seconds per update)``,
and the same for back to back. ``breakdown`` splits one back-to-back update into
its parts (what the ClientApp adds to pure compute; bench ``fleet_parts``).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, Metadata, RecordDict

from clients.app import app as client_app
from clients.trainer import dp_generator, train_on_device
from fl import protocol as P
from fl.config import compose, fleet_spec, recipe, task_params
from fl.data.device_data import load_device_data
from fl.pretrain import load_checkpoint
from fl.privacy.ledger import PhotoLedger
from fl.privacy.plan import privacy_plan
from fl.tasks import get_task
from fl.tracking import keys as K
from fl.tracking.model_init import resolve_init

TRAIN_ONLY = ["fleet.eval_devices=0", "fleet.newuser_identities=0"]


def _fleet_rates(cfg, repeats: int) -> tuple[list[float], list[float]]:
    """Per launch: device updates per second over the rounds after the first, and the
    first round's seconds. Round 1 waits for Ray's actor pool to start (each worker
    imports torch and the ClientApp): that is start-up, paid once per simulation, and
    reported on its own rather than spread over the updates."""
    from server.simulation import simulate

    rates, first = [], []
    for _ in range(repeats):
        history = simulate(cfg).history
        first.append(history[1][K.ROUND_SECONDS])
        rounds = [history[r] for r in history if r > 1]
        updates = sum(m[K.DEVICES_TRAINED] for m in rounds)
        rates.append(updates / sum(m[K.ROUND_SECONDS] for m in rounds))
    return rates, first


def _cold_caches() -> None:
    """Forget what a process learns once and reuses (the photo ledger's epsilons and
    RDP curves, the per-sample engine's verified model structures), so the two
    in-process modes start as a fleet's fresh worker does, and neither inherits the
    other's work."""
    from clients import per_sample
    from fl.privacy import ledger

    ledger._epsilon.cache_clear()
    ledger._one_step_rdp.cache_clear()
    per_sample._VERIFIED.clear()


def _devices(cfg, updates: int) -> list[int]:
    """The devices both in-process modes train: drawn like a fleet's rounds."""
    rng = np.random.default_rng(0)
    return [int(d) for d in rng.choice(cfg.fleet.num_devices, updates, replace=True)]


def _back_to_back_seconds(cfg, devices: list[int]) -> list[float]:
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(cfg.model.init)
    spec = fleet_spec(cfg)
    config = P.round_config(recipe(cfg, privacy_plan(cfg).photo), task_params(cfg), spec)
    config["server-round"] = 1
    contexts: dict[int, Context] = {}
    seconds = []
    for device in devices:
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


def _pure_compute_seconds(cfg, devices: list[int]) -> list[float]:
    """``train_on_device`` alone: every model built, its weights loaded, and every
    device's photos loaded before the clock starts."""
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(cfg.model.init)
    spec = fleet_spec(cfg)
    the_recipe = recipe(cfg, privacy_plan(cfg).photo)
    task = get_task(task_params(cfg))
    prepared = []
    for device in devices:
        model = task.build_model(spec.image_size)
        model.load_state_dict({**checkpoint["shared"], **checkpoint["personal_init"]},
                              strict=False)
        tensors = task.training_tensors(load_device_data(spec, device))
        prepared.append((device, model, tensors))
    seconds = []
    for device, model, tensors in prepared:
        ledger = PhotoLedger(accountant=the_recipe.accountant)
        generator = dp_generator(the_recipe, 1, device)
        start = time.perf_counter()
        outcome = train_on_device(task, model, tensors, the_recipe, ledger, generator)
        seconds.append(time.perf_counter() - start)
        assert outcome.status == "trained", outcome
    return seconds


def run(rounds: int = 6, repeats: int = 3, overrides: list[str] | None = None,
        backends: tuple[str, ...] = ("ray", "pool")) -> list[dict]:
    """Rows for each simulation backend (``fleet.backend``), then the two in-process
    modes and the ratios of core-seconds per update."""
    cfg = compose(TRAIN_ONLY + [f"fleet.rounds={rounds}"] + list(overrides or []))
    cfg.model.init = resolve_init(cfg)
    workers = max(1, int((os.cpu_count() or 1) // cfg.fleet.cpus_per_device))
    nan = float("nan")
    devices = _devices(cfg, rounds * cfg.fleet.devices_per_round)
    _cold_caches()
    b2b = statistics.median(_back_to_back_seconds(cfg, devices)[1:])
    _cold_caches()  # as cold as a fleet's freshly started worker, like back to back
    pure = statistics.median(_pure_compute_seconds(cfg, devices)[1:])
    rows, ratios = [], []
    for backend in backends:
        cfg.fleet.backend = backend
        rates, first = _fleet_rates(cfg, repeats)
        fleet_rate = statistics.median(rates)
        fleet = workers / fleet_rate
        name = f"fleet.backend={backend} ({cfg.fleet.num_devices} devices, {workers} workers)"
        rows += [
            {"mode": f"{name}, rounds 2-{rounds}", "updates_per_s": fleet_rate,
             "core_s_per_update": fleet},
            {"mode": f"{name}, round 1 (workers starting): seconds", "updates_per_s": nan,
             "core_s_per_update": statistics.median(first)},
        ]
        ratios.append({"mode": f"{name} / pure compute (core-s per update)",
                       "updates_per_s": nan, "core_s_per_update": fleet / pure})
    return rows + [
        {"mode": "back to back ClientApp (1 process, 1 thread)", "updates_per_s": 1 / b2b,
         "core_s_per_update": b2b},
        {"mode": "pure compute: train_on_device (1 process, 1 thread)",
         "updates_per_s": 1 / pure, "core_s_per_update": pure},
        *ratios,
        {"mode": "back to back / pure compute", "updates_per_s": nan,
         "core_s_per_update": b2b / pure},
    ]


def _with_digest(update: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    from clients.device_state import update_digest

    return update, update_digest(update)


def breakdown(devices: int = 12) -> list[dict]:
    """What the ClientApp's ``train`` does around ``train_on_device``, part by part
    (medians over ``devices`` devices, first two dropped as warm-up): the photos'
    first load (SynthFaces renders them), model construction, weight (de)coding
    between Flower's ``ArrayRecord`` and torch, the update's digest, and the
    device's state saved and read back."""
    import tempfile

    from clients.device_state import DeviceStore, load_personal, save_state

    torch.set_num_threads(1)
    cfg = compose(TRAIN_ONLY)
    cfg.model.init = resolve_init(cfg)
    checkpoint = load_checkpoint(cfg.model.init)
    spec, the_recipe = fleet_spec(cfg), recipe(cfg, privacy_plan(cfg).photo)
    task = get_task(task_params(cfg))
    parts: dict[str, list[float]] = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        out = fn()
        parts.setdefault(name, []).append(time.perf_counter() - start)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        for device in range(devices):
            data = timed("photos: first load", lambda d=device: load_device_data(spec, d))
            incoming = ArrayRecord(checkpoint["shared"])
            shared = timed("weights in: ArrayRecord -> torch", incoming.to_torch_state_dict)
            model = timed("model construction", lambda: task.build_model(spec.image_size))
            timed("weights loaded into the model", lambda m=model, s=shared: m.load_state_dict(
                {**s, **checkpoint["personal_init"]}, strict=False))
            ledger = PhotoLedger(accountant=the_recipe.accountant)
            timed("train_on_device (pure compute)", lambda m=model, d=data, lg=ledger, i=device:
                  train_on_device(task, m, task.training_tensors(d), the_recipe, lg,
                                  dp_generator(the_recipe, 1, i)))
            update = timed("update: shared state + digest", lambda m=model: _with_digest(
                task.shared_state(m)))
            store = DeviceStore(f"{tmp}/device-{device}", "bench")
            timed("state saved (fsync)", lambda s=store, m=model, lg=ledger, u=update:
                  save_state(s, 1, m, task, lg, u[1]))
            timed("weights out: torch -> ArrayRecord", lambda u=update: ArrayRecord(u[0]))
            timed("personal part read back", lambda s=store, m=model: load_personal(
                s, 2, m, task, checkpoint["personal_init"]))
    medians = {name: statistics.median(values[2:]) for name, values in parts.items()}
    pure = medians["train_on_device (pure compute)"]
    return [{"part": name, "seconds": value, "share_of_pure_compute": value / pure}
            for name, value in medians.items()]
