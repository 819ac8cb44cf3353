"""Central pretraining on public identities (cached by config).

    python -m experiments.pretrain [overrides]

Prints the checkpoint path; pass it to a federated run as ``model.init=<path>``.
``python -m experiments.train`` (and ``make run``) call this automatically when
``model.init`` is null.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fl.config import CONFIG_DIR, validate


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    validate(cfg)
    from fl.tracking.model_init import resolve_init

    print(resolve_init(cfg), flush=True)


if __name__ == "__main__":
    main()
