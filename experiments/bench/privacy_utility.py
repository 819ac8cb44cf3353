"""Quality under privacy: the default fleet at privacy=none, photo, user, photo_user.

    python -m experiments.bench privacy_utility

Reports swap PSNR beside its baselines and the pretrained model, and the epsilons
of both units, side by side (one full simulation per setting).
"""

from __future__ import annotations

from fl.config import compose
from fl.tracking import keys as K
from fl.tracking.model_init import resolve_init
from server.console import last_value

SETTINGS = ("none", "photo", "user", "photo_user")


def run(settings: tuple[str, ...] = SETTINGS, overrides: list[str] | None = None) -> list[dict]:
    from server.simulation import simulate

    rows = []
    for privacy in settings:
        cfg = compose([f"privacy={privacy}", *(overrides or [])])
        cfg.model.init = resolve_init(cfg)
        history = simulate(cfg).history

        def last(key: str, history=history) -> float:
            return last_value(history, key)

        rows.append({
            "privacy": privacy,
            "swap_psnr": last(K.SWAP_PSNR),
            "before_finetuning": history[0][K.SWAP_PSNR],
            "baseline_clip": last(K.SWAP_PSNR_BASELINE_CLIP),
            "baseline_mean": last(K.SWAP_PSNR_BASELINE_MEAN),
            "newuser_psnr": last(K.NEWUSER_SWAP_PSNR),
            "photo_eps_max": last(K.PHOTO_EPS_MAX),
            "photo_eps_mean": last(K.PHOTO_EPS_MEAN),
            "user_eps": last(K.USER_EPS),
            "rounds_run": max(history),
        })
    return rows
