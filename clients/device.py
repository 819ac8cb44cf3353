"""What a device may use this round: its photos, filtered by its owner's consent.

Every message a device handles starts here, so consent, "delete my data" and
unusable files are handled in one place, before any training or evaluation:

1. read the consent manifest from the device's own directory (every round, so a
   change takes effect at the next round);
2. if the user asked to delete their data, erase the personal state and the
   decoded photos, keep the privacy ledger, and opt out for good;
3. load the photos (cached), and apply consent per purpose.

The report that goes back to the server holds counts only, and its reason says
what kind of problem there was and how many photos it touched: never a file
name, photo id or path (they may name a person). The device's own log has the
details.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import Context

from clients.device_state import STATE_DIR_KEY, StoreUnavailable, erase_all_personal
from fl import protocol as P
from fl.data import consent
from fl.data.device_data import DeviceData, forget, load_device_data
from fl.data.fleet import FleetSpec
from fl.tasks.base import Task

log = logging.getLogger(__name__)

DATA_DIR_KEY = "data-dir"  # node config of a real device: its photos and consent.json
NO_STATE_DIR = ("refused: a real device keeps its privacy ledger in its own state "
                "directory, and this SuperNode has none; restart it with --node-config "
                "'... state-dir=\"/path\"' (without one the ledger would live where the "
                "server says, and the device's privacy spend would be forgotten between runs)")


def device_index(context: Context) -> int:
    """Which device this node is. In simulation Flower assigns ``partition-id``."""
    if "partition-id" not in context.node_config:
        raise ValueError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            "--node-config 'partition-id=<device index>'"
        )
    return int(context.node_config["partition-id"])


def is_real_device(context: Context) -> bool:
    """Whether this SuperNode is a real device: its owner gave it its own photos
    (``data-dir``) or state (``state-dir``) in its node config, which the server
    cannot set. A simulated device has neither."""
    return DATA_DIR_KEY in context.node_config or STATE_DIR_KEY in context.node_config


def require_state_dir(context: Context, spec: FleetSpec) -> None:
    """A real device (its own ``data-dir``, or ``data=device``) trains only with
    its own ``state-dir``: otherwise its ledger would live under the server's
    ``devices.storage_dir``, one per run, and its spend across runs be lost."""
    real = DATA_DIR_KEY in context.node_config or spec.source == "device"
    if real and STATE_DIR_KEY not in context.node_config:
        raise StoreUnavailable("this SuperNode has a data-dir (or runs data=device) but no "
                               "state-dir in its node config", NO_STATE_DIR)


def device_dir(context: Context, recipe: P.Recipe) -> Path:
    """Where the device's consent manifest lives: a real device's ``data-dir``, or
    its directory under ``devices.storage_dir`` in simulation."""
    if DATA_DIR_KEY in context.node_config:
        return Path(str(context.node_config[DATA_DIR_KEY]))
    return Path(recipe.device_storage) / f"device-{device_index(context):05d}"


def device_spec(context: Context, spec: FleetSpec) -> FleetSpec:
    """``data=device``: this device's photos are in its own ``data-dir``."""
    if spec.source == "device":
        return replace(spec, root=str(context.node_config.get(DATA_DIR_KEY, "")))
    return spec


@dataclass
class DeviceView:
    data: DeviceData | None  # consented photos; None when the device takes no part
    report: dict[str, int] = field(default_factory=dict)
    reason: str = ""  # why the device takes no part, if it does not

    @property
    def can_train(self) -> bool:
        return self.data is not None and len(self.data.train) > 0

    @property
    def can_evaluate(self) -> bool:
        return self.data is not None and len(self.data.heldout) > 0


def erase(context: Context, recipe: P.Recipe, spec: FleetSpec, device: int, folder: Path,
          manifest: consent.Manifest) -> None:
    """Carry out "delete my data": personal weights and decoded photos go; the
    privacy ledger stays; the manifest records when it was done."""
    erase_all_personal(context, recipe, device)
    forget(spec, device)
    if manifest.deleted is None:
        manifest.deleted = datetime.now(UTC)
        consent.write_manifest(folder, manifest)


def open_device(context: Context, spec: FleetSpec, recipe: P.Recipe, task: Task) -> DeviceView:
    device, spec = device_index(context), device_spec(context, spec)
    folder = device_dir(context, recipe)
    manifest, error = None, ""
    try:
        manifest = consent.read_manifest(folder)
    except consent.ConsentError as err:
        log.warning("device %d: %s; no photo is used until it is fixed", device, err)
        error = f"consent manifest unusable, nothing used: {err.public}"
    if manifest is not None and manifest.delete_my_data:
        erase(context, recipe, spec, device, folder, manifest)
        return DeviceView(None, {P.OPTED_OUT: 1, P.DELETED: 1}, "the user deleted their data")
    data = load_device_data(spec, device)
    report = {P.PHOTOS_SKIPPED: len(data.skipped), P.PHOTOS_CONVERTED: len(data.converted)}
    excluded = data.excluded or (
        f"task {task.name} needs photo controls; this data source has none"
        if task.needs_controls and data.train_controls is None else "")
    if excluded:
        return DeviceView(None, report | {P.EXCLUDED: 1}, excluded)
    decision = consent.decide(manifest, recipe.consent_default, data.train_ids,
                              data.heldout_ids, error=error)
    usable = data.select(decision.train, decision.heldout)
    report |= {P.PHOTOS_WITHDRAWN: decision.withdrawn, P.OPTED_OUT: int(not any(decision.train))}
    reason = decision.reason or ("no photo is consented for federated training"
                                 if not any(decision.train) else "")
    return DeviceView(usable, report, reason)
