"""Hydra config <-> what the server and devices need, validated before any work.

Every check names the config key and says what would be accepted, so a bad
override fails in a second with a fix instead of an hour into a run.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fl.data.consent import DEFAULTS
from fl.data.device_data import available_devices, source_names
from fl.data.fleet import FleetSpec
from fl.data.synthfaces import MAX_SIZE, MIN_SIZE
from fl.device import DeviceUnavailable, check_name, resolve
from fl.faults import KINDS as FAULT_KINDS
from fl.privacy.ledger import ACCOUNTANTS
from fl.privacy.noise import NOISE_MODES, SEEDED
from fl.privacy.plan import PhotoPlan
from fl.privacy.user_level import SAMPLING, USER_ACCOUNTANTS
from fl.protocol import Recipe

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


# The only classes a config (or a resume checkpoint's config) may instantiate:
# Flower's strategies, by their public module, with plain-value arguments.
STRATEGY_MODULE = "flwr.serverapp.strategy"
FEDFACE_STRATEGY_KEYS = ("update_norm_bound", "max_examples")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {expected}. Override it, e.g. "
                          f"`python -m experiments.train {key}=<value>`.")


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first value that cannot work.

    An on-disk dataset is scanned once the source checks pass, and
    ``fleet.num_devices`` is set to the fleet it can form (``resolve_fleet``),
    so the checks below judge the fleet that will actually run.
    """
    from fl.tasks import task_names

    _validate_types(cfg)
    _require(cfg.task.name in task_names(), "task.name", cfg.task.name,
             f"one of {task_names()}")
    _validate_source(cfg)
    resolve_fleet(cfg)
    d, f, p, loc = cfg.data, cfg.fleet, cfg.privacy.photo, cfg.local
    _require(MIN_SIZE <= d.image_size <= MAX_SIZE and d.image_size % 16 == 0,
             "data.image_size", d.image_size,
             f"a multiple of 16 between {MIN_SIZE} and {MAX_SIZE}")
    _require(d.photos_max >= d.photos_min, "data.photos_max", d.photos_max,
             f"at least data.photos_min ({d.photos_min})")
    _require(1 <= f.devices_per_round <= f.num_devices, "fleet.devices_per_round",
             f.devices_per_round, f"between 1 and fleet.num_devices ({f.num_devices})")
    _require(0 <= f.eval_devices <= f.num_devices, "fleet.eval_devices", f.eval_devices,
             f"between 0 and fleet.num_devices ({f.num_devices})")
    _require(loc.optimizer in ("sgd", "adam"), "local.optimizer", loc.optimizer,
             "sgd or adam")
    _require(f.sampling in SAMPLING, "fleet.sampling", f.sampling, f"one of {list(SAMPLING)}")
    noise = cfg.privacy.get("noise")
    _require(noise in NOISE_MODES, "privacy.noise", noise, f"one of {list(NOISE_MODES)}")
    _require(not (d.source == "device" and noise == SEEDED), "privacy.noise", noise,
             "secure with data=device: seeded noise is rebuilt by anyone who knows the "
             "run's seed (the server, readers of MLflow), so real devices refuse it")
    if p.enabled:
        _validate_noise("privacy.photo", p)
        _require(p.max_grad_norm > 0, "privacy.photo.max_grad_norm", p.max_grad_norm,
                 "positive")
        _validate_delta("privacy.photo.delta", p.delta, d.photos_max, "data.photos_max",
                        "photo")
        _require(p.accountant in ACCOUNTANTS, "privacy.photo.accountant", p.accountant,
                 f"one of {list(ACCOUNTANTS)}")
        _require((p.budget_epsilon or 0) >= 0, "privacy.photo.budget_epsilon",
                 p.budget_epsilon, "non-negative (0 means no budget)")
    u = cfg.privacy.user
    if u.enabled:
        _validate_noise("privacy.user", u)
        _require(u.clip > 0, "privacy.user.clip", u.clip, "positive")
        trains = cfg.task.get("device_trains", None)
        _require(trains is None or len(trains) > 0, "task.device_trains", "[]",
                 "at least one shared module while privacy.user is on: devices that train "
                 "only their personal part send no update for DP-FedAvg to protect; use "
                 "privacy=photo for personal-only training")
        simulated = bool(u.simulated_population or u.simulated_cohort_size)
        if simulated:
            _require(1 <= u.simulated_cohort_size <= u.simulated_population,
                     "privacy.user.simulated_cohort_size", u.simulated_cohort_size,
                     "set together with privacy.user.simulated_population, between 1 and it")
        population = u.simulated_population if simulated else f.num_devices
        _validate_delta("privacy.user.delta", u.delta, population,
                        "the population (fleet.num_devices or the simulated population)", "user")
        _require(u.accountant in USER_ACCOUNTANTS, "privacy.user.accountant", u.accountant,
                 f"one of {list(USER_ACCOUNTANTS)}")
        _require(u.accountant == "rdp" or f.sampling == "poisson", "privacy.user.accountant",
                 u.accountant, "rdp when fleet.sampling=fixed (PLD has no sampling-without-"
                 "replacement event); or set fleet.sampling=poisson")
        _require((u.budget_epsilon or 0) >= 0, "privacy.user.budget_epsilon", u.budget_epsilon,
                 "non-negative (0 means no budget)")
    _validate_faults(cfg)
    validate_strategy(cfg)
    _validate_secure_aggregation(cfg)
    _validate_tracking(cfg)
    _validate_hardware(cfg)
    _validate_pretrain_data(cfg)


def _validate_pretrain_data(cfg: DictConfig) -> None:
    """``pretrain.data`` names a source; an on-disk one needs its directory."""
    from fl.pretrain_data import photo_source  # torch: only where pretraining is configured

    try:
        photo_source(cfg.pretrain)
    except ValueError as err:
        raise ConfigError(f"{err}. Override it, e.g. `python -m experiments.pretrain "
                          "pretrain.data=folders pretrain.root=/data/lfw`.") from None


def _validate_secure_aggregation(cfg: DictConfig) -> None:
    """``aggregation.secure`` needs a bound on every update (it sets the quantization
    range) and a mean the server can take from a sum alone."""
    agg = cfg.get("aggregation") or {}
    secure = agg.get("secure", False)
    _require(isinstance(secure, bool), "aggregation.secure", secure, "true or false")
    _validate_noise_at(cfg, secure)
    if not secure:
        return
    _require(cfg.fleet.devices_per_round >= 2, "aggregation.secure", secure,
             "false with fleet.devices_per_round=1: a sum of one update is that update")
    _require(cfg.fleet.devices_per_round >= agg.min_survivors, "aggregation.min_survivors",
             agg.min_survivors, f"at most fleet.devices_per_round={cfg.fleet.devices_per_round}"
             " (a round of fewer devices is never unmasked), or more devices per round")
    if cfg.privacy.user.enabled:
        return
    _require(float(cfg.strategy.update_norm_bound) > 0, "strategy.update_norm_bound",
             cfg.strategy.update_norm_bound, "positive with aggregation.secure=true and no "
             "privacy.user: each device clips its update to it before masking")
    _require(str(cfg.strategy.get("_target_", "")).endswith(".FedAvg"), "strategy._target_",
             cfg.strategy.get("_target_"), "FedAvg with aggregation.secure=true and no "
             "privacy.user: the server sees only the sum, so it can take a mean, not a "
             "median or a trimmed mean")


def _validate_noise_at(cfg: DictConfig, secure: bool) -> None:
    """``privacy.user.noise_at=devices``: each device adds its share of the noise
    before masking, so only a secure aggregate may be released, and the noise is the
    real cohort's (no simulated one)."""
    from fl.privacy.plan import DEVICES, NOISE_AT

    u = cfg.privacy.user
    noise_at = u.get("noise_at", "server")
    _require(noise_at in NOISE_AT, "privacy.user.noise_at", noise_at, f"one of {list(NOISE_AT)}")
    if noise_at != DEVICES:
        return
    _require(bool(u.enabled), "privacy.user.noise_at", noise_at,
             "server without user-level DP (privacy.user.enabled=false adds no noise)")
    _require(secure, "privacy.user.noise_at", noise_at,
             "server, or set aggregation.secure=true: devices add their noise before "
             "masking, and only secure aggregation sums it")
    _require(not (u.simulated_population or u.simulated_cohort_size),
             "privacy.user.noise_at", noise_at, "server with a simulated cohort "
             "(privacy.user.simulated_*): devices' noise is the real cohort's")


def _validate_faults(cfg: DictConfig) -> None:
    """``faults.share`` and ``faults.kinds`` turn simulated faults on together,
    and never on real devices."""
    share, kinds = fault_settings(cfg)
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    _require(not unknown, "faults.kinds", kinds, f"a list of {list(FAULT_KINDS)}")
    _require(bool(share) == bool(kinds), "faults.share" if kinds else "faults.kinds",
             share if kinds else kinds,
             "set together: faults.share > 0 and a non-empty faults.kinds, e.g. "
             "faults.share=0.2 'faults.kinds=[nan,crash]' (or faults=all)")
    _require(not kinds or cfg.data.source != "device", "faults.kinds", kinds,
             "empty with data=device: simulated faults are for simulated fleets only")


BACKENDS = ("ray", "pool")  # fleet.backend: who runs the simulated devices (server.simulation)
RAY_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9._-]+:\d+)$")


def _validate_hardware(cfg: DictConfig) -> None:
    """``device`` is a device this machine has (``fl.device``); ``fleet.ray_address``
    is null or a Ray address; a GPU share needs a device that computes on a GPU."""
    name = cfg.get("device") or "auto"
    try:
        check_name(name)
        resolve(name)
    except DeviceUnavailable as err:
        raise ConfigError(f"{err}. Override it, e.g. `python -m experiments.train "
                          "device=cpu`.") from None
    address = cfg.fleet.get("ray_address")
    _require(address is None or isinstance(address, str) and bool(RAY_ADDRESS.match(address)),
             "fleet.ray_address", address,
             "null (a Ray instance of this process) or the address of a running Ray cluster: "
             "auto, <head ip>:<port> or ray://<head ip>:<port> (`ray start --head` prints it)")
    gpus = float(cfg.fleet.get("gpus_per_device") or 0)
    _require(gpus == 0 or name != "cpu", "fleet.gpus_per_device", gpus,
             "0 with device=cpu (a GPU share for devices that compute on the CPU would only "
             "keep Ray from starting them); set device=auto or cuda")
    backend = cfg.fleet.get("backend") or "ray"
    _require(backend in BACKENDS, "fleet.backend", backend,
             f"one of {list(BACKENDS)} (ray: Flower's Simulation Engine; pool: long-lived "
             "worker processes on this machine, server.pool)")
    _require(backend == "ray" or (address is None and gpus == 0), "fleet.backend", backend,
             "ray with fleet.ray_address or fleet.gpus_per_device: a pool is one machine's "
             "processes, without Ray's cluster or GPU shares")


def fault_settings(cfg: DictConfig) -> tuple[float, list[str]]:
    """(share, kinds) of ``faults.*``; (0, []) when off."""
    faults = cfg.get("faults") or {}
    kinds = faults.get("kinds") or []
    _require(OmegaConf.is_list(kinds) or isinstance(kinds, list), "faults.kinds", kinds,
             "a list, e.g. 'faults.kinds=[nan,crash]'")
    return float(faults.get("share") or 0.0), [str(k) for k in kinds]


# Every numeric key a run reads: (key, whole number?, low, high, low included?).
# Checked before anything compares them, so `fleet.rounds=abc` or
# `fleet.devices_per_round=2.5` names its key instead of failing deep inside.
INF = math.inf
NUMBERS: tuple[tuple[str, bool, float, float, bool], ...] = (
    ("seed", True, 0, 2**63 - 1, True),
    ("data.seed", True, 0, 2**63 - 1, True),
    ("data.crop", False, 0, 1, False),
    ("data.image_size", True, 1, INF, True),
    ("data.photos_min", True, 2, INF, True),
    ("data.photos_max", True, 1, INF, True),
    ("data.heldout_photos", True, 1, INF, True),
    ("data.num_public", True, 0, INF, True),
    ("data.clip_length", True, 1, INF, True),
    ("fleet.num_devices", True, 1, INF, True),
    ("fleet.devices_per_round", True, 1, INF, True),
    ("fleet.rounds", True, 1, INF, True),
    ("fleet.eval_devices", True, 0, INF, True),
    ("fleet.newuser_every", True, 0, INF, True),
    ("fleet.newuser_identities", True, 0, INF, True),
    ("fleet.newuser_steps", True, 0, INF, True),
    ("fleet.round_timeout", False, 0, INF, False),
    ("fleet.cpus_per_device", False, 0, INF, False),
    ("fleet.gpus_per_device", False, 0, INF, True),
    ("fleet.start_quorum", False, 0, 1, False),
    ("fleet.unavailable_after", True, 0, INF, True),
    ("fleet.retry_after", True, 1, INF, True),
    ("local.epochs", False, 0, INF, False),
    ("local.personal_epochs", False, 0, INF, True),
    ("local.batch_size", True, 1, INF, True),
    ("local.lr_shared", False, 0, INF, True),
    ("local.lr_personal", False, 0, INF, True),
    ("privacy.photo.noise_multiplier", False, 0, INF, False),
    ("privacy.photo.target_epsilon", False, 0, INF, False),
    ("privacy.photo.max_grad_norm", False, 0, INF, False),
    ("privacy.photo.delta", False, 0, 1, False),
    ("privacy.photo.budget_epsilon", False, 0, INF, True),
    ("privacy.user.noise_multiplier", False, 0, INF, False),
    ("privacy.user.target_epsilon", False, 0, INF, False),
    ("privacy.user.clip", False, 0, INF, False),
    ("privacy.user.delta", False, 0, 1, False),
    ("privacy.user.budget_epsilon", False, 0, INF, True),
    ("privacy.user.simulated_cohort_size", True, 0, INF, True),
    ("privacy.user.simulated_population", True, 0, INF, True),
    ("strategy.update_norm_bound", False, 0, INF, True),
    ("strategy.max_examples", True, 0, INF, True),
    ("aggregation.num_shares", False, 0, 1, False),
    ("aggregation.threshold", False, 0, 1, False),
    ("aggregation.min_survivors", True, 3, INF, True),
    ("faults.share", False, 0, 1, True),
    ("tracking.samples_every", True, 0, INF, True),
    ("tracking.audit_delta", False, 0, 1, False),
    ("tracking.audit_confidence", False, 0.5, 1, False),
    ("tracking.audit_canaries_per_device", True, 1, INF, True),
    ("tracking.audit_user_canaries", False, 0, 1, True),
    ("tracking.audit_inversion_devices", True, 0, INF, True),
    ("tracking.audit_inversion_steps", True, 0, INF, True),
    ("tracking.audit_inversion_images", True, 1, INF, True),
    ("pretrain.steps", True, 0, INF, True),
    ("pretrain.batch_size", True, 1, INF, True),
    ("pretrain.lr", False, 0, INF, False),
    ("pretrain.crop", False, 0, 1, False),
)
# Keys whose null means "not set" (the checks below say when one must be set).
NULLABLE = {"privacy.photo.noise_multiplier", "privacy.photo.target_epsilon",
            "privacy.photo.delta", "privacy.photo.budget_epsilon",
            "privacy.user.noise_multiplier", "privacy.user.target_epsilon",
            "privacy.user.delta", "privacy.user.budget_epsilon"}


def _validate_types(cfg: DictConfig, prefix: str = "") -> None:
    """Each numeric key (under ``prefix``) is a finite number of the right kind,
    in its range."""
    for key, whole, low, high, low_included in NUMBERS:
        if not key.startswith(prefix):
            continue
        unit = key.split(".")[1] if key.startswith("privacy.") else ""
        if unit and not OmegaConf.select(cfg, f"privacy.{unit}.enabled", default=False):
            continue  # a unit that is off reads none of its values
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and (key in NULLABLE or OmegaConf.select(
                cfg, key, default="absent") == "absent"):
            continue
        kind = "a whole number" if whole else "a finite number"
        if whole:  # 2.0 is refused too: range(), numpy seeds and Ray need an int
            _require(isinstance(value, int) and not isinstance(value, bool), key, value, kind)
        else:
            _require(_is_number(value) and math.isfinite(value), key, value, kind)
        above = value >= low if low_included else value > low
        _require(above and value <= high, key, value,
                 f"{kind} {'>=' if low_included else '>'} {low:g}"
                 + (f" and <= {high:g}" if high < INF else ""))


def _targets(node: Any, path: str = "") -> list[str]:
    """Dotted paths of every ``_target_`` in a config subtree."""
    if isinstance(node, dict):
        found = [path + "_target_"] if "_target_" in node else []
        for key, value in node.items():
            found += _targets(value, f"{path}{key}.")
        return found
    if isinstance(node, list):
        return [t for i, value in enumerate(node) for t in _targets(value, f"{path}{i}.")]
    return []


def validate_strategy(cfg: DictConfig) -> None:
    """Only an allow-listed strategy may be instantiated, with plain arguments:
    a config is also what a resume checkpoint carries, and a nested ``_target_``
    there would run any callable (a reviewer's checkpoint ran ``os.makedirs``)."""
    from flwr.serverapp import strategy as flower_strategies
    from flwr.serverapp.strategy import Strategy

    tree = OmegaConf.to_container(cfg, resolve=False)
    stray = [t for t in _targets(tree) if t != "strategy._target_"]
    _require(not stray, stray[0] if stray else "",
             OmegaConf.select(cfg, stray[0], default=None) if stray else None,
             "absent: only strategy._target_ may name a class")
    target = str(cfg.strategy.get("_target_", ""))
    module, _, name = target.rpartition(".")
    found = getattr(flower_strategies, name, None) if module == STRATEGY_MODULE else None
    _require(isinstance(found, type) and issubclass(found, Strategy), "strategy._target_",
             target, f"a class of {STRATEGY_MODULE} (e.g. {STRATEGY_MODULE}.FedAvg, "
             "FedMedian, FedTrimmedAvg), the only classes a config may instantiate")
    _validate_types(cfg, "strategy.")  # update_norm_bound, max_examples (also on resume)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def tracking_uri(cfg: DictConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite store here."""
    return str(cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def _validate_tracking(cfg: DictConfig) -> None:
    t = cfg.tracking
    _require(t.samples_every >= 0, "tracking.samples_every", t.samples_every,
             "0 (no sample grids) or a positive number of rounds")
    uri = tracking_uri(cfg)
    _require(not t.register_model or "://" in uri and not uri.startswith("file:"),
             "tracking.register_model", t.register_model,
             f"null with the file store {uri!r}: the MLflow Model Registry needs a database "
             "(sqlite:///mlflow.db) or a tracking server (http://host:port)")


def _validate_source(cfg: DictConfig) -> None:
    """Data source, dataset root, consent default and labels fit together."""
    d = cfg.data
    _require(d.source in source_names(), "data.source", d.source, f"one of {source_names()}")
    _require(cfg.devices.consent_default in (*DEFAULTS, "auto"), "devices.consent_default",
             cfg.devices.consent_default, f"one of {[*DEFAULTS, 'auto']}")
    if d.source == "synthfaces":
        return
    if d.source != "device":  # data=device: each device reads its own data-dir
        _require(bool(d.root) and Path(str(d.root)).is_dir(), "data.root", d.root,
                 f"the directory holding the {d.source} dataset")
    _require(cfg.devices.consent_default in DEFAULTS, "devices.consent_default",
             cfg.devices.consent_default,
             f"grant or deny: data={d.source} reads real people's photos, so say whether "
             "photos of devices without a consent.json may be used (grant: you hold consent "
             "for the whole dataset; deny: only photos listed in each device's manifest)")
    if d.source == "folders" and cfg.task.name == "portrait":
        _require(bool(d.get("controls_csv")), "data.controls_csv", d.get("controls_csv"),
                 "a CSV of portrait controls (header file,yaw,pitch,smile[,light_x,light_y], "
                 "file relative to data.root): the portrait task learns to draw a face under "
                 "controls and per-identity folders carry none")
    _require(0 < float(d.get("crop", 1.0)) <= 1, "data.crop", d.get("crop"), "in (0, 1]")


def resolve_fleet(cfg: DictConfig) -> int:
    """Size the fleet by the data: an on-disk dataset has as many devices as
    identities with enough photos, and ``fleet.num_devices`` caps that number.
    Sets ``fleet.num_devices`` to the size used and returns it."""
    if cfg.data.source not in ("synthfaces", "device"):
        available = available_devices(fleet_spec(cfg, num_devices=10**9))
        if available == 0:
            raise ConfigError(
                f"data.root={cfg.data.root!r} has no identity with at least data.photos_min + "
                f"data.heldout_photos = {cfg.data.photos_min + cfg.data.heldout_photos} photos; "
                "lower those or add photos")
        cfg.fleet.num_devices = min(int(cfg.fleet.num_devices), available)
    return int(cfg.fleet.num_devices)


def _validate_noise(prefix: str, section: DictConfig) -> None:
    noise, target = section.noise_multiplier, section.target_epsilon
    _require((noise is None) != (target is None), f"{prefix}.noise_multiplier", noise,
             f"set exactly one of {prefix}.noise_multiplier and {prefix}.target_epsilon "
             f"(got target_epsilon={target})")
    if noise is not None:
        _require(noise > 0, f"{prefix}.noise_multiplier", noise,
                 "positive (DP without noise is not private; turn this unit off instead)")
    else:
        _require(target > 0, f"{prefix}.target_epsilon", target, "positive")


def _validate_delta(key: str, delta: float | None, units: int, units_name: str,
                    unit: str) -> None:
    if delta is None:
        return
    _require(0 < delta < 1, key, delta, "strictly between 0 and 1")
    _require(delta < 1.0 / units, key, delta,
             f"below 1/{units_name} = {1.0 / units:.4g}: a larger delta admits mechanisms "
             f"that publish one {unit}'s data outright")


def fleet_spec(cfg: DictConfig, num_devices: int | None = None) -> FleetSpec:
    d = cfg.data
    return FleetSpec(source=str(d.source), root=str(d.get("root") or ""),
                     controls_csv=str(d.get("controls_csv") or ""),
                     crop=float(d.get("crop", 1.0)), seed=d.seed,
                     num_devices=num_devices or cfg.fleet.num_devices,
                     photos_min=d.photos_min, photos_max=d.photos_max,
                     heldout_photos=d.heldout_photos, image_size=d.image_size,
                     num_public=d.num_public, clip_length=d.clip_length)


def consent_default(cfg: DictConfig) -> str:
    """``auto`` grants for SynthFaces only (validation makes real data choose)."""
    choice = str(cfg.devices.consent_default)
    return "grant" if choice == "auto" else choice


def recipe(cfg: DictConfig, photo: PhotoPlan) -> Recipe:
    """The round instructions for devices, with the *resolved* photo-level plan."""
    loc = cfg.local
    share, faults = fault_settings(cfg)
    return Recipe(local_epochs=float(loc.epochs), personal_epochs=float(loc.personal_epochs),
                  batch_size=int(loc.batch_size),
                  lr_shared=float(loc.lr_shared), lr_personal=float(loc.lr_personal),
                  personal_lr_decay=bool(loc.personal_lr_decay),
                  personal_lr_noise_scaled=bool(loc.personal_lr_noise_scaled),
                  optimizer=str(loc.optimizer),
                  photo_dp=photo.enabled, noise_multiplier=photo.noise_multiplier,
                  max_grad_norm=photo.max_grad_norm, delta=photo.delta,
                  accountant=photo.accountant, budget_epsilon=photo.budget_epsilon,
                  seed=int(cfg.seed), noise=str(cfg.privacy.noise),
                  consent_default=consent_default(cfg),
                  device_storage=str(cfg.devices.storage_dir),
                  faults=",".join(faults), fault_share=share,
                  fault_hang_seconds=float(cfg.fleet.round_timeout) + 5.0,
                  device=str(cfg.get("device") or "auto"))


def objective_key(cfg: DictConfig) -> str:
    """The MLflow key ``experiments.train`` returns: ``objective.metric``, or the
    task's main quality metric."""
    from fl.tasks import get_task
    from fl.tracking.keys import QUALITY

    return str(cfg.objective.metric or QUALITY[get_task(task_params(cfg)).primary_metric])


def task_params(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.task, resolve=True)


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Dotted keys -> values as strings: the MLflow params of a run."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config ``experiments.train`` would see, for entry points without
    ``@hydra.main`` (``flwr run .``, tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))
