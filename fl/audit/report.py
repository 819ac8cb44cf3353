"""The audit's report: ``audit/report.json``, ``audit/report.md`` and the MLflow keys.

Both units are compared at the audit's delta' (``tracking.audit_delta``); the
accountant's epsilon at the run's own delta is reported beside it. An epsilon
that no DP bounds (the unit is off) is ``null`` in the JSON and ``inf`` in MLflow.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fl.tracking import keys as K

PHOTO_ADVERSARY = ("the server, which sees each device's update: scores each canary photo by "
                   "its least-squares share of the unit update among minus the gradients, at "
                   "the weights it sent, of the device's canaries and of public faces "
                   "(presence), or by its loss drop, summed over the device's rounds")
USER_ADVERSARY = ("anyone who sees the released models: the cosine between each canary "
                  "user's direction and the final model change, against directions never "
                  "inserted")


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def build(result, run_deltas: dict[str, float | None],
          theory_at_run_delta: dict[str, float]) -> dict[str, Any]:
    """The report's data from a ``server.audit.AuditResult``."""
    s, photo, user, inv = result.settings, result.photo, result.user, result.inversion
    return {
        "run_id": result.run_id,
        "confidence": s.confidence,
        "delta": s.delta,
        "rounds": result.rounds,
        "violation": result.violation,
        "planted_bug": result.planted_bug,
        "photo": {
            "adversary": PHOTO_ADVERSARY,
            "relation": "add/remove one canary photo (independent fair coin per canary)",
            "epsilon_lower_bound": photo.epsilon_lower if photo else None,
            "epsilon_theory": _num(result.photo_theory),
            "run_delta": run_deltas.get("photo"),
            "epsilon_theory_at_run_delta": _num(theory_at_run_delta.get("photo", math.inf)),
            "canaries": photo.guesses.canaries if photo else 0,
            "guesses": photo.guesses.guesses if photo else 0,
            "correct_guesses": photo.guesses.correct if photo else 0,
            "k_in": photo.k_in if photo else 0,
            "k_out": photo.k_out if photo else 0,
            "candidates": photo.candidates if photo else 0,
            "ceiling": photo.ceiling if photo else None,
        },
        "user": {
            "adversary": USER_ADVERSARY,
            "relation": "add/remove one user (a canary device inserted or never inserted)",
            "kind": "estimate (Andrew et al. 2023), not a bound",
            "epsilon_lower_bound": user.epsilon if user else None,
            "interval": list(user.interval) if user else None,
            "epsilon_theory": _num(result.user_theory),
            "run_delta": run_deltas.get("user"),
            "epsilon_theory_at_run_delta": _num(theory_at_run_delta.get("user", math.inf)),
            "inserted": user.inserted if user else 0,
            "held_out": user.held_out if user else 0,
            "mu": user.mu if user else None,
            "dim": user.dim if user else None,
        },
        "inversion": {
            "seen": inv.seen if inv else None,
            "psnr": inv.psnr if inv else None,
            "ssim": inv.ssim if inv else None,
            "mean_face_psnr": inv.mean_face_psnr if inv else None,
            "steps": s.inversion_steps,
        },
    }


def metrics(data: dict[str, Any]) -> dict[str, float]:
    """The MLflow keys (README "MLflow metric keys"); nan where nothing was measured."""
    def value(x) -> float:
        return math.nan if x is None else float(x)

    photo, user, inv = data["photo"], data["user"], data["inversion"]
    return {
        K.AUDIT_PHOTO_EPS_LOWER: value(photo["epsilon_lower_bound"]),
        K.AUDIT_PHOTO_EPS_THEORY: math.inf if photo["epsilon_theory"] is None
        else photo["epsilon_theory"],
        K.AUDIT_USER_EPS_LOWER: value(user["epsilon_lower_bound"]),
        K.AUDIT_USER_EPS_THEORY: math.inf if user["epsilon_theory"] is None
        else user["epsilon_theory"],
        K.AUDIT_CANARIES: float(photo["canaries"]),
        K.AUDIT_CORRECT_GUESSES: float(photo["correct_guesses"]),
        K.AUDIT_INVERSION_PSNR: value(inv["psnr"]),
        K.AUDIT_INVERSION_SSIM: value(inv["ssim"]),
        K.AUDIT_MEAN_FACE_PSNR: value(inv["mean_face_psnr"]),
        K.AUDIT_VIOLATION: float(bool(data["violation"])),
    }


def as_json(data: dict[str, Any]) -> str:
    """Nested JSON, plus the dotted keys the issue names (``photo.epsilon_lower_bound``...)."""
    flat = {f"{unit}.{k}": v for unit in ("photo", "user", "inversion")
            for k, v in data[unit].items()}
    return json.dumps(data | flat, indent=2, allow_nan=False)


def _fmt(x) -> str:
    if x is None:
        return "none (no DP)" if x is None else ""
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def to_markdown(data: dict[str, Any]) -> str:
    p, u, i = data["photo"], data["user"], data["inversion"]
    verdict = ("**VIOLATION: an observed lower bound exceeds the theoretical epsilon; the "
               "mechanism does not do what its accountant assumes.**" if data["violation"]
               else "No violation: every observed bound is at or below its theoretical epsilon.")
    lines = [
        "# Privacy audit", "",
        verdict, "",
        (f"Confidence {data['confidence']}, compared at delta' = {data['delta']:g} "
        f"({data['rounds']} rounds)."),
        "", "| unit | theory at delta' | observed | theory at the run's delta | what |",
        "|---|---|---|---|---|",
        (f"| photo | {_fmt(p['epsilon_theory'])} | {_fmt(p['epsilon_lower_bound'])} "
        f"(lower bound; ceiling {_fmt(p['ceiling'])}) | {_fmt(p['epsilon_theory_at_run_delta'])}"
        f" (delta {_fmt(p['run_delta'])}) | {p['correct_guesses']} of {p['guesses']} guesses "
        f"right, {p['canaries']} canaries |"),
        (f"| user | {_fmt(u['epsilon_theory'])} | {_fmt(u['epsilon_lower_bound'])} (estimate, "
        f"interval {u['interval'] and [round(v, 3) for v in u['interval']]}) | "
        f"{_fmt(u['epsilon_theory_at_run_delta'])} (delta {_fmt(u['run_delta'])}) | "
        f"{u['inserted']} canary users, {u['held_out']} held out |"),
        "",
        f"Photo-level adversary: {p['adversary']}.",
        f"User-level adversary: {u['adversary']}.",
        "",
        "## Gradient inversion",
        "",
        (f"Attacked: one device's first {i['seen']} ({i['steps']} steps of Inverting Gradients)."
        f" Best reconstruction PSNR {_fmt(i['psnr'])} dB, SSIM {_fmt(i['ssim'])}; "
        f"the mean public face scores {_fmt(i['mean_face_psnr'])} dB against the same photos."),
        "",
        ("A lower bound far below the theory is expected (docs/privacy.md, \"Empirical "
        "audit\"); one above it is a bug."),
    ]
    if data["planted_bug"]:
        lines += ["", f"Test-only planted bug: `{data['planted_bug']}`."]
    return "\n".join(lines) + "\n"
