"""What a researcher reads on the console: one line per round, one summary."""

from __future__ import annotations

import math

from fl.privacy.noise import SECURE, SEEDED_CAVEAT
from fl.privacy.plan import PrivacyPlan
from fl.tracking import keys as K

# What sums up a round's quality, first match wins: the task's ground-truth metric
# with its baselines (SynthFaces), else the held-out metric real photos allow.
QUALITY_LINES = (
    ((K.SWAP_PSNR, "swap"), (K.SWAP_PSNR_BASELINE_CLIP, "clip"),
     (K.SWAP_PSNR_BASELINE_MEAN, "mean")),
    ((K.PORTRAIT_PSNR, "portrait"), (K.PORTRAIT_PSNR_BASELINE_MEAN, "mean")),
    ((K.PORTRAIT_HELDOUT_PSNR, "held-out portrait"),),
    ((K.RECON_PSNR, "reconstruction"),),
)
NEWUSER_KEYS = tuple(K.NEWUSER.values())
# The attribute net's face metrics beside the decibels (fl.face_metrics): whose face,
# and how far the pose or the requested controls are off.
FACE_LINES = ((K.SWAP_ID_ACCURACY, K.SWAP_POSE_ERROR, "pose err"),
              (K.PORTRAIT_ID_ACCURACY, K.PORTRAIT_CONTROL_ERROR, "control err"))


def _db(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key, float("nan"))
    return "  -  " if math.isnan(value) else f"{value:5.2f}"


def _quality(m: dict[str, float]) -> str:
    for line in QUALITY_LINES:
        if line[0][0] in m:
            (key, label), *baselines = line
            text = f"{label} {_db(m, key)} dB"
            if baselines:
                text += " [" + " | ".join(f"{b} {_db(m, k)}" for k, b in baselines) + "]"
            return text
    return "quality   -  "


def format_round(rnd: int, rounds: int, m: dict[str, float]) -> str:
    head = f"round {rnd:>3}/{rounds}"
    if rnd == 0:
        head += "  (pretrained, before fine-tuning)"
    else:
        head += (f"  trained {int(m.get(K.DEVICES_TRAINED, 0))}/"
                 f"{int(m.get(K.DEVICES_SAMPLED, 0))}"
                 f"  loss {m.get(K.TRAIN_LOSS, float('nan')):.4f}")
    parts = [head, _quality(m)]
    parts += [f"id {m[ident]:.2f} {label} {m.get(error, float('nan')):.3f}"
              for ident, error, label in FACE_LINES if ident in m]
    parts += [f"new-user {_db(m, key)} dB" for key in NEWUSER_KEYS if key in m]
    if K.PHOTO_EPS_MAX in m:
        parts.append(f"photo eps max {m[K.PHOTO_EPS_MAX]:.2f}")
    if K.USER_EPS in m:
        parts.append(f"user eps {m[K.USER_EPS]:.2f}")
    if K.SIM_USER_EPS in m:
        parts.append(f"(simulated user eps {m[K.SIM_USER_EPS]:.2f})")
    if m.get(K.DEVICES_BUDGET_EXHAUSTED):
        parts.append(f"at budget {int(m[K.DEVICES_BUDGET_EXHAUSTED])}")
    if m.get(K.DEVICES_FAILED):
        parts.append(f"failed {int(m[K.DEVICES_FAILED])}")
    if m.get(K.CONSENT_DEVICES_OPTED_OUT):
        parts.append(f"opted out {int(m[K.CONSENT_DEVICES_OPTED_OUT])}")
    if m.get(K.DATA_PHOTOS_SKIPPED) or m.get(K.DATA_DEVICES_EXCLUDED):
        parts.append(f"files skipped {int(m.get(K.DATA_PHOTOS_SKIPPED, 0))}, devices excluded "
                     f"{int(m.get(K.DATA_DEVICES_EXCLUDED, 0))}")
    if K.ROUND_SECONDS in m:
        parts.append(f"{m[K.ROUND_SECONDS]:.1f}s")
    return "  ".join(parts)


def last_value(history: dict[int, dict[str, float]], key: str) -> float:
    for rnd in sorted(history, reverse=True):
        if key in history[rnd]:
            return history[rnd][key]
    return float("nan")


def noise_line(plan: PrivacyPlan) -> str:
    """The noise mode, said plainly: under ``seeded`` whom the epsilons do not
    protect against; under ``secure`` where the noise came from."""
    if plan.noise == SECURE:
        return ("noise        secure: OS randomness on each device (DP-SGD noise, Poisson "
                "masks) and at the server (DP-FedAvg noise)")
    return f"noise        seeded: {SEEDED_CAVEAT}"


def _privacy_lines(history: dict[int, dict[str, float]], plan: PrivacyPlan) -> list[str]:
    def last(key: str) -> float:
        return last_value(history, key)

    lines = []
    photo, user = plan.photo, plan.user
    if photo.enabled:
        lines.append(f"photo level  epsilon max {last(K.PHOTO_EPS_MAX):.2f}, mean "
                     f"{last(K.PHOTO_EPS_MEAN):.2f} at delta {photo.delta:g} per photo "
                     f"({photo.accountant.upper()}, noise {photo.noise_multiplier:.3g}, "
                     f"clip {photo.max_grad_norm:g})")
    if user.enabled:
        m = user.mechanism
        lines.append(f"user level   epsilon {last(K.USER_EPS):.2f} at delta "
                     f"{last(K.USER_DELTA):.2g} per user ({m.accountant.upper()}, "
                     f"{m.sampling} sampling, noise {last(K.USER_NOISE_MULTIPLIER):.3g}, "
                     f"clip {m.clip:g})" + ("; no budget or target applies to it"
                                           if m.simulated else ""))
        if m.simulated:
            limit = f", budget {user.budget_epsilon:g}" if user.budget_epsilon else ""
            lines.append(f"SIMULATED    epsilon {last(K.SIM_USER_EPS):.2f} at delta {m.delta:.2g} "
                         f"as if {m.cohort} of {m.population} devices took part per round{limit} "
                         "(a simulation of a larger deployment, not this run's guarantee)")
    if not lines:
        return ["privacy      none (privacy=none): no differential privacy guarantee"]
    return [*lines, noise_line(plan)]


def format_summary(history: dict[int, dict[str, float]], plan: PrivacyPlan, run_id: str,
                   ui_command: str, experiment: str) -> str:
    first = history.get(0, {})

    def last(key: str) -> float:
        return last_value(history, key)

    final = {key: last(key) for key in {k for m in history.values() for k in m}}
    quality = [f"quality      {_quality(final)}  (before fine-tuning: {_quality(first)})"]
    for key, label in ((K.SWAP_SSIM, "swap SSIM"), (K.PORTRAIT_SSIM, "portrait SSIM")):
        if key in final:
            quality.append(f"{label:<12} {final[key]:.3f}")
    quality += [f"new user     {final[key]:.2f} dB {task} PSNR (pretrained: "
                f"{first.get(key, float('nan')):.2f} dB)"
                for task, key in (("swap", K.NEWUSER_SWAP_PSNR),
                                  ("portrait", K.NEWUSER_PORTRAIT_PSNR)) if key in final]
    if final.get(K.DATA_PHOTOS_SKIPPED) or final.get(K.DATA_DEVICES_EXCLUDED):
        quality.append(f"data         {int(final.get(K.DATA_PHOTOS_SKIPPED, 0))} files skipped, "
                       f"{int(final.get(K.DATA_DEVICES_EXCLUDED, 0))} devices excluded: list "
                       "them with `python -m experiments.check_data <the same overrides>`")
    return "\n".join([
        "",
        "== fedface run finished ==",
        *quality,
        *_privacy_lines(history, plan),
        f"MLflow run   {run_id}  (experiment '{experiment}')",
        f"open the UI  {ui_command}",
    ])
