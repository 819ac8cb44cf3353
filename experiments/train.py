"""Run one fedface experiment (or a sweep with ``-m``).

    python -m experiments.train [overrides]
    python -m experiments.train -m privacy.photo.noise_multiplier=0.5,1.0

Returns the final value of ``objective.metric`` so Hydra sweepers (e.g. Optuna)
can optimise it.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from fl.config import CONFIG_DIR, ConfigError, objective_key, validate


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        validate(cfg)
    except ConfigError as err:
        print(f"fedface: invalid configuration: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # Pretrain (or reuse the cache) before Ray starts, so it has the cores to itself.
    from fl.tracking.model_init import resolve_init
    from server.simulation import simulate

    OmegaConf.set_struct(cfg, False)
    cfg.model.init = resolve_init(cfg)
    summary = simulate(cfg)
    return summary.final(objective_key(cfg))


if __name__ == "__main__":
    main()
