"""One poisoned device in ten: what it does to swap quality, with and without a bound.

    python -m experiments.bench poisoning

The default fleet without DP (``privacy=none``, where nothing else bounds a
device), with 10% of devices sending a scaled, sign-flipped update
(``faults.kinds=[flip_sign]``, ``fl.faults.FLIP_FACTOR`` times the honest update,
negated) or a huge one (``huge_norm``, x``fl.faults.HUGE_FACTOR``): plain FedAvg,
FedAvg with ``strategy.update_norm_bound``, and FedMedian, against the same fleet
with no poisoned device.
"""

from __future__ import annotations

from fl.config import compose
from fl.tracking import keys as K
from fl.tracking.model_init import resolve_init
from server.console import last_value

POISONED = ["faults.share=0.1", "faults.kinds=[flip_sign]"]
HUGE = ["faults.share=0.1", "faults.kinds=[huge_norm]"]
BOUND = 0.05  # the same L2 norm as the user-level clip of the recommended setting
BOUNDED = [f"strategy.update_norm_bound={BOUND}", "strategy.max_examples=1"]
SETTINGS = {
    "clean, FedAvg": [],
    "flip_sign, FedAvg": POISONED,
    f"flip_sign, FedAvg + update_norm_bound={BOUND}": [*POISONED, *BOUNDED],
    "flip_sign, FedMedian": [*POISONED, "strategy=fedmedian"],
    "huge_norm, FedAvg": HUGE,
    f"huge_norm, FedAvg + update_norm_bound={BOUND}": [*HUGE, *BOUNDED],
}


def run(overrides: list[str] | None = None, only: tuple[str, ...] = ()) -> list[dict]:
    from server.simulation import simulate

    rows = []
    for name, extra in SETTINGS.items():
        if only and not name.startswith(only):
            continue
        cfg = compose(["privacy=none", "fleet.newuser_identities=0",
                       "tracking.samples_every=0", *extra, *(overrides or [])])
        cfg.model.init = resolve_init(cfg)
        try:
            history = simulate(cfg).history
        except RuntimeError as err:  # e.g. a non-finite aggregate: nothing released
            rows.append({"setting": name, "swap_psnr": float("nan"), "swap_ssim": float("nan"),
                         "before_finetuning": float("nan"), "devices_trained_per_round": 0,
                         "stopped": str(err).splitlines()[0][:80]})
            continue
        rows.append({
            "setting": name,
            "swap_psnr": last_value(history, K.SWAP_PSNR),
            "swap_ssim": last_value(history, K.SWAP_SSIM),
            "before_finetuning": history[0][K.SWAP_PSNR],
            "devices_trained_per_round": sum(
                history[r].get(K.DEVICES_TRAINED, 0) for r in history if r) / max(history),
        })
    return rows
