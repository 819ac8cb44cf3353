"""Central pretraining on public identities (cached by config).

    python -m experiments.pretrain [overrides]
    python -m experiments.pretrain pretrain.commit=true [overrides]

Prints the checkpoint path; pass it to a federated run as ``model.init=<path>``.
``python -m experiments.train`` (and ``make run``) call this automatically when
``model.init`` is null.

With ``pretrain.commit=true`` the checkpoint and its record (config hash, loss
curve, wall time, final loss, SHA-256, and this command) are copied to
``checkpoints/pretrain/``, where ``make run`` finds them by config hash; a
checkpoint over 20 MB is refused. ``tests/models/test_committed_checkpoint.py``
replays the first steps of every committed record.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl.config import CONFIG_DIR, ConfigError, validate

MAX_COMMITTED_BYTES = 20 * 1024 * 1024


def commit(path: Path, overrides: list[str]) -> Path:
    """Copy a freshly trained checkpoint and its record into the committed folder."""
    from fl.pretrain import COMMITTED_DIR, record_path

    record = record_path(path)
    if path.parent.resolve() == COMMITTED_DIR.resolve():
        return path
    if not record.is_file():
        raise ConfigError(f"{path} has no record ({record.name}): it was not trained by this "
                          "version; delete it from the cache and run the command again")
    if path.stat().st_size > MAX_COMMITTED_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size / 2**20:.1f} MB; committed "
                          "checkpoints must stay under 20 MB (use a smaller task.width)")
    meta = json.loads(record.read_text())
    kept = [o for o in overrides if not o.startswith("pretrain.commit")]
    meta["command"] = " ".join(["python -m experiments.pretrain", *kept])
    COMMITTED_DIR.mkdir(parents=True, exist_ok=True)
    target = COMMITTED_DIR / path.name
    shutil.copyfile(path, target)
    record_path(target).write_text(json.dumps(meta, indent=1))
    return target


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    validate(cfg)
    from fl.tracking.model_init import resolve_init

    path = Path(resolve_init(cfg))
    if cfg.pretrain.get("commit", False):
        path = commit(path, list(HydraConfig.get().overrides.task))
        print(f"committed: {path} and {path.with_suffix('.record.json').name}", flush=True)
    print(path, flush=True)


if __name__ == "__main__":
    main()
