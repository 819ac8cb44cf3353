"""Audit the privacy of one real simulated run: observed lower bounds beside the theory.

    python -m experiments.audit [overrides]          # the same Hydra config as train
    python -m experiments.audit privacy=none fleet.rounds=5

Runs the configured experiment once with canaries planted (``server.audit``),
then logs to that MLflow run (tag ``fedface.role=audit``) the keys ``audit/*``
and the artifacts ``audit/report.md``, ``audit/report.json`` and
``audit/inversion.png``. Exit status 3 when an observed bound exceeds its
theoretical epsilon (``audit/violation=1``). Refuses ``data=device``: the audit
inverts photos, which it may do only on SynthFaces or data the researcher owns.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fl.config import CONFIG_DIR, ConfigError, validate

VIOLATION_EXIT = 3


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from fl.tracking.model_init import resolve_init
    from server.audit import check_auditable, log_audit, run_audit

    given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    if "local.personal_epochs" not in given and cfg.local.personal_epochs > 0:
        cfg.local.personal_epochs = 0.0  # the one phase the canary scores assume
        print("audit: local.personal_epochs=0 (one joint phase of local.epochs; the photo "
              "canaries are scored at the public personal part)", flush=True)
    try:
        if cfg.resume:
            raise ConfigError("the audit runs a fresh experiment; drop resume=")
        check_auditable(cfg)
        validate(cfg)
    except ConfigError as err:
        print(f"fedface: invalid configuration: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    OmegaConf.set_struct(cfg, False)
    cfg.model.init = resolve_init(cfg)  # before Ray starts, as experiments.train does
    result = run_audit(cfg)
    log_audit(cfg, result, role=True)
    if result.violation:
        raise SystemExit(VIOLATION_EXIT)
    return result.photo.epsilon_lower if result.photo else float("nan")


if __name__ == "__main__":
    main()
