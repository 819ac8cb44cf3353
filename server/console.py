"""What a researcher reads on the console: one line per round, one summary."""

from __future__ import annotations

import math

from fl.protocol import Recipe
from fl.tracking import keys as K


def _db(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key, float("nan"))
    return "  -  " if math.isnan(value) else f"{value:5.2f}"


def format_round(rnd: int, rounds: int, per_round: int, m: dict[str, float]) -> str:
    head = f"round {rnd:>3}/{rounds}"
    if rnd == 0:
        head += "  (pretrained, before fine-tuning)"
    else:
        head += (f"  trained {int(m.get(K.DEVICES_TRAINED, 0))}/{per_round}"
                 f"  loss {m.get(K.TRAIN_LOSS, float('nan')):.4f}")
    parts = [head,
             (f"swap {_db(m, K.SWAP_PSNR)} dB [clip {_db(m, K.SWAP_PSNR_BASELINE_CLIP)}"
             f" | mean {_db(m, K.SWAP_PSNR_BASELINE_MEAN)}]")]
    if K.NEWUSER_SWAP_PSNR in m:
        parts.append(f"new-user {_db(m, K.NEWUSER_SWAP_PSNR)} dB")
    if K.PHOTO_EPS_MAX in m:
        parts.append(f"photo eps max {m[K.PHOTO_EPS_MAX]:.2f}")
    if m.get(K.DEVICES_BUDGET_EXHAUSTED):
        parts.append(f"at budget {int(m[K.DEVICES_BUDGET_EXHAUSTED])}")
    if m.get(K.DEVICES_FAILED):
        parts.append(f"failed {int(m[K.DEVICES_FAILED])}")
    if K.ROUND_SECONDS in m:
        parts.append(f"{m[K.ROUND_SECONDS]:.1f}s")
    return "  ".join(parts)


def last_value(history: dict[int, dict[str, float]], key: str) -> float:
    for rnd in sorted(history, reverse=True):
        if key in history[rnd]:
            return history[rnd][key]
    return float("nan")


def format_summary(history: dict[int, dict[str, float]], recipe: Recipe, run_id: str,
                   ui_command: str, experiment: str) -> str:
    first = history.get(0, {})
    last = lambda key: last_value(history, key)
    if recipe.photo_dp:
        privacy = (f"photo-level epsilon max {last(K.PHOTO_EPS_MAX):.2f}, mean "
                   f"{last(K.PHOTO_EPS_MEAN):.2f} at delta {recipe.delta:g} per photo "
                   f"({recipe.accountant.upper()} accountant, noise {recipe.noise_multiplier:g}, "
                   f"clip {recipe.max_grad_norm:g})")
    else:
        privacy = "none (privacy=none): no differential privacy guarantee"
    return "\n".join([
        "",
        "== fedface run finished ==",
        (f"swap PSNR    {last(K.SWAP_PSNR):.2f} dB  (before fine-tuning "
        f"{first.get(K.SWAP_PSNR, float('nan')):.2f} dB; baselines: clip frame "
        f"{last(K.SWAP_PSNR_BASELINE_CLIP):.2f} dB, user's mean photo "
        f"{last(K.SWAP_PSNR_BASELINE_MEAN):.2f} dB)"),
        f"swap SSIM    {last(K.SWAP_SSIM):.3f}   reconstruction PSNR {last(K.RECON_PSNR):.2f} dB",
        (f"new user     {last(K.NEWUSER_SWAP_PSNR):.2f} dB swap PSNR (pretrained: "
        f"{first.get(K.NEWUSER_SWAP_PSNR, float('nan')):.2f} dB)"),
        f"privacy      {privacy}",
        f"MLflow run   {run_id}  (experiment '{experiment}')",
        f"open the UI  {ui_command}",
    ])
