"""The privacy review artifacts of a run: ledger table, report, epsilon chart.

A reviewer opening the MLflow run should not need the code to answer: which
units are protected, by what mechanism and parameters, with which accountant and
neighbouring relation, what was spent, what the trust assumptions are, and what
leaves a device without DP.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fl.privacy.plan import PrivacyPlan
from fl.tracking import keys as K

# What leaves a device besides the DP-protected shared weights.
RELEASED_WITHOUT_DP = {
    "evaluation metrics (the task's PSNR/SSIM on held-out photos or the public benchmark, "
    "with the personal part)": "not covered by DP",
    "number of training photos (num-examples) and held-out photos": "not covered by DP",
    "training loss of the round": "not covered by DP",
    "status (trained / budget exhausted), participations, DP-SGD steps, sample rate, "
    "photo-level epsilon": "not covered by DP (functions of the photo count and the schedule)",
    "device index (roll call)": "pseudonymous; not covered by DP",
    "consent and data counts (photos used, withdrawn, skipped, converted; opted out, "
    "deleted, excluded) and a one-line reason when the device did not train":
        "not covered by DP; counts only, never photo ids or file names",
}


def ledger_rows(devices: dict[int, Any], plan: PrivacyPlan) -> list[dict[str, Any]]:
    """One row per device, pseudonymous, in device order."""
    rows = []
    for record in sorted(devices.values(), key=lambda r: r.device):
        row = asdict(record)
        row["noise_multiplier"] = plan.photo.noise_multiplier
        row["delta"] = plan.photo.delta
        rows.append(row)
    return rows


def units_that_hold(plan: PrivacyPlan) -> dict[str, str]:
    photo = ("holds: every on-device parameter trained on the photos (personal part "
             "included) is trained by one DP-SGD with joint per-sample clipping"
             if plan.photo.enabled else "does not hold: privacy.photo.enabled=false")
    user = ("holds for the released shared model: each device's whole update is clipped "
            "and the sum is noised, whatever the device computed"
            if plan.user.enabled else "does not hold: privacy.user.enabled=false")
    return {"photo": photo, "user": user}


def report(plan: PrivacyPlan, history: dict[int, dict[str, float]],
           stopped: str = "") -> dict[str, Any]:
    """The report as a JSON-able dict (``to_markdown`` renders it)."""
    last = history[max(history)] if history else {}
    out: dict[str, Any] = {"units": units_that_hold(plan), "stopped_early": stopped or None}
    if plan.photo.enabled:
        p = plan.photo
        out["photo_level"] = {
            "mechanism": "DP-SGD (Opacus) on each device, Poisson sampling of photos",
            "neighbouring_relation": "add/remove one photo of one device",
            "accountant": p.accountant, "noise_multiplier": p.noise_multiplier,
            "noise_calibrated_for_target_epsilon": p.target_epsilon,
            "max_grad_norm": p.max_grad_norm, "delta": p.delta,
            "budget_epsilon": p.budget_epsilon or None,
            "final_epsilon_max": last.get(K.PHOTO_EPS_MAX),
            "final_epsilon_mean": last.get(K.PHOTO_EPS_MEAN),
            "final_epsilon_p95": last.get(K.PHOTO_EPS_P95),
        }
    if plan.user.enabled:
        m = plan.user.mechanism
        user = {
            "mechanism": "DP-FedAvg: clip each device's update of the device-trained shared "
                         "weights, equal-weight sum, Gaussian noise, fixed denominator",
            "sampling": m.sampling, "neighbouring_relation": m.relation,
            "accountant": m.accountant, "clip": m.clip,
            "noise_calibrated_for_target_epsilon": plan.user.target_epsilon,
            "budget_epsilon": plan.user.budget_epsilon or None,
            "noise_multiplier": last.get(K.USER_NOISE_MULTIPLIER),
            "population": None if m.simulated else m.population,
            "cohort": None if m.simulated else m.cohort,
            "delta": last.get(K.USER_DELTA), "final_epsilon": last.get(K.USER_EPS),
        }
        if m.simulated:
            user["simulated_deployment"] = {
                "note": "SIMULATION of a larger deployment: noise and accounting as if "
                        f"{m.cohort} of {m.population} devices took part per round; not "
                        "this run's guarantee (that is final_epsilon above)",
                "noise_multiplier": m.noise_multiplier, "population": m.population,
                "cohort": m.cohort, "delta": m.delta,
                "final_epsilon": last.get(K.SIM_USER_EPS)}
        out["user_level"] = user
    out["trust_assumptions"] = [
        ("No secure aggregation: the server sees each device's individual update. That "
        "update is photo-level DP (when privacy.photo is on) but not user-level DP; "
        "user-level DP protects only the released aggregate and model."),
        ("The server is trusted to add the user-level noise and to sample devices as "
        "accounted; devices are trusted to run DP-SGD as instructed and to enforce their "
        "own budget."),
        ("Noise comes from a seeded PRNG (reproducible simulation); a deployment should "
        "use a cryptographically secure generator (Opacus secure_mode)."),
    ]
    out["released_without_dp"] = RELEASED_WITHOUT_DP
    return out


def to_markdown(data: dict[str, Any]) -> str:
    lines = ["# Privacy report", ""]
    lines += ["## Which units hold", ""]
    lines += [f"- **{unit}-level**: {text}" for unit, text in data["units"].items()]
    if data.get("stopped_early"):
        lines += ["", f"**Stopped early:** {data['stopped_early']}"]
    for section in ("photo_level", "user_level"):
        if section in data:
            lines += ["", f"## {section.replace('_', '-')}", "", "| parameter | value |",
                      "|---|---|"]
            for key, value in data[section].items():
                if isinstance(value, dict):
                    value = "; ".join(f"{k}={v}" for k, v in value.items())
                lines.append(f"| {key} | {value} |")
    lines += ["", "## Trust assumptions", ""] + [f"- {t}" for t in data["trust_assumptions"]]
    lines += ["", "## What else leaves a device", "", "| released | DP |", "|---|---|"]
    lines += [f"| {what} | {dp} |" for what, dp in data["released_without_dp"].items()]
    return "\n".join(lines) + "\n"


def epsilon_chart(history: dict[int, dict[str, float]], plan: PrivacyPlan):
    """Epsilon against round for both units, budgets drawn as dashed lines."""
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted: list[float] = []
    series = [(K.PHOTO_EPS_MAX, "photo-level (max over devices)", plan.photo.budget_epsilon),
              (K.PHOTO_EPS_MEAN, "photo-level (mean)", 0.0),
              (K.USER_EPS, "user-level", plan.user.budget_epsilon),
              (K.SIM_USER_EPS, "user-level, SIMULATED deployment", 0.0)]
    for key, label, budget in series:
        points = sorted((r, m[key]) for r, m in history.items() if key in m)
        if not points:
            continue
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                        label=label)
        plotted += [p[1] for p in points if p[1] > 0]
        if budget:
            ax.axhline(budget, linestyle="--", color=line.get_color(),
                       label=f"{label.split(' (')[0]} budget {budget:g}")
    if plotted and max(plotted) > 100 * min(plotted):
        ax.set_yscale("log")  # e.g. a simulated cohort beside the real run's epsilon
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon")
    ax.set_title("Privacy spent per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def as_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, default=str)
