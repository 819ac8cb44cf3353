"""Run one fedface experiment (or a sweep with ``-m``).

    python -m experiments.train [overrides]
    python -m experiments.train -m privacy.photo.noise_multiplier=0.5,1.0
    python -m experiments.train experiment=privacy_utility -m
    python -m experiments.train resume=<MLflow run id or checkpoint path>

Returns the final value of ``objective.metric`` so Hydra sweepers (e.g. Optuna)
can optimise it.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fl.config import CONFIG_DIR, ConfigError, objective_key, validate


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from fl.tracking.model_init import resolve_init
    from server.resume import resumed_config
    from server.simulation import simulate

    checkpoint = None
    try:
        if cfg.resume:
            cfg, checkpoint = resumed_config(cfg, list(HydraConfig.get().overrides.task))
        validate(cfg)
    except ConfigError as err:
        print(f"fedface: invalid configuration: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if checkpoint is None:
        # Pretrain (or reuse the cache) before Ray starts, so it has the cores to itself.
        OmegaConf.set_struct(cfg, False)
        cfg.model.init = resolve_init(cfg)
    if cfg.tracking.audit and checkpoint is None:
        # The run itself is audited: canaries planted, audit/* logged to its MLflow run.
        from server.audit import check_auditable, log_audit, run_audit
        try:
            check_auditable(cfg)
        except ConfigError as err:
            print(f"fedface: invalid configuration: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        result = run_audit(cfg)
        log_audit(cfg, result, role=False)
        return result.summary.final(objective_key(cfg))
    summary = simulate(cfg, resume=checkpoint)
    return summary.final(objective_key(cfg))


if __name__ == "__main__":
    main()
