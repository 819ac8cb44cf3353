"""The privacy review artifacts of a run: ledger table, report, epsilon chart.

A reviewer opening the MLflow run should not need the code to answer: where the
noise came from (and, when seeded, whom the epsilons do not protect against),
which units are protected, by what mechanism and parameters, with which accountant
and neighbouring relation, what was spent, what the trust assumptions are, what is
taken as public, and what leaves a device, or the server, without DP. A simulated
cohort's values appear only in their own, labelled section.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fl.privacy.noise import SECURE, SEEDED_CAVEAT
from fl.privacy.plan import DEVICES, PrivacyPlan
from fl.tracking import keys as K

# What leaves a device besides the DP-protected shared weights.
RELEASED_WITHOUT_DP = {
    "evaluation metrics (quality/*: the task's PSNR/SSIM on held-out photos or the public "
    "benchmark, with the personal part)": "not covered by DP",
    "quality/swap_psnr_baseline_mean and quality/portrait_psnr_baseline_mean: PSNR of the "
    "mean of the device's TRAINING photos": "not covered by DP: computed from the training "
    "photos themselves, without noise",
    "training loss of the round (train/loss)": "not covered by DP: computed on the training "
    "photos, without noise",
    "number of training photos (num-examples) and held-out photos":
        "not covered by DP; treated as public (below)",
    "status (trained / budget exhausted), participations, DP-SGD steps, sample rate, "
    "photo-level epsilon": "not covered by DP (functions of the photo count and the schedule)",
    "device index (roll call)": "pseudonymous; not covered by DP",
    "consent and data counts (photos used, withdrawn, skipped, converted; opted out, "
    "deleted, excluded) and a one-line reason when the device did not train":
        "not covered by DP; counts only, never photo ids or file names",
}

# What the server itself publishes (MLflow) outside both DP mechanisms, and what
# each weakens: the user-level epsilon covers only the released model.
RELEASED_BY_SERVER_WITHOUT_DP = {
    "fleet/update_clip_fraction (per round)": "computed from the individual, un-noised "
    "updates (the fraction whose norm passed the clip): a function of each device's update "
    "before noise, so in a small cohort it tells whether one device's update was large",
    "fleet/devices_sampled, fleet/devices_trained, fleet/devices_failed, "
    "fleet/devices_rejected, fleet/devices_unavailable, fleet/devices_absent (per round)":
        "reveal the size of each round's cohort and how many of it trained, failed, were "
        "rejected, paused or absent; changes between rounds show when devices joined, "
        "failed or dropped out",
    "privacy/ledger.json (per device: participations, steps, sample rate, photo-level "
    "epsilon, status, consent and data counts)": "reveals which pseudonymous device took "
    "part how often (with the per-round counts and photo-level epsilons, in which rounds); "
    "the user-level epsilon's amplification by sampling assumes who took part when is "
    "secret, so against a reader who knows a device's rounds its guarantee is the weaker, "
    "unamplified one. Its sample rate and steps reveal the device's photo count",
    "consent/photos_used, fleet/devices_budget_exhausted, consent/*, data/* (per round)":
        "sums of what devices release without DP (above); with one trained device, "
        "consent/photos_used is that device's photo count",
}

# Inputs both mechanisms take as known to everyone; DP hides none of them.
TREATED_AS_PUBLIC = {
    "each device's photo count n": "sets the Poisson rate q = 1/ceil(n/B) (as Opacus counts "
    "batches) and the number of DP-SGD steps per round, hence the device's photo-level epsilon; it leaves the device "
    "as num-examples and in the ledger's sample rate and steps",
    "the run's config, including seed (MLflow params)": "under privacy.noise=seeded the "
    "seed reproduces every noise draw (see noise)",
}

SECURE_SOURCE = ("device: the operating system's randomness (os.urandom) seeds the DP-SGD "
                 "noise and the Poisson sampling masks; server: the operating system's "
                 "randomness seeds the DP-FedAvg noise. Never stored, sent or logged; "
                 "Gaussian draws use Opacus' secure_mode floating-point mitigation")
SEEDED_SOURCE = ("generators seeded from the run's public seed, the round and the device "
                 "(a reproducible simulation)")
SECTION_TITLES = {"photo_level": "photo-level", "user_level": "user-level",
                  "user_level_simulated": "user-level, SIMULATED deployment"}


def _last_metrics(history: dict[int, dict[str, float]]) -> dict[str, float]:
    return history[max(history)] if history else {}


def ledger_rows(devices: dict[int, Any], plan: PrivacyPlan) -> list[dict[str, Any]]:
    """One row per device, pseudonymous, in device order."""
    rows = []
    for record in sorted(devices.values(), key=lambda r: r.device):
        row = asdict(record)
        row["noise_multiplier"] = plan.photo.noise_multiplier
        row["delta"] = plan.photo.delta
        rows.append(row)
    return rows


def _seed_caveat(plan: PrivacyPlan) -> str:
    return "" if plan.noise == SECURE else "; only against parties that do not know the seed"


def _user_unit(plan: PrivacyPlan, last: dict[str, float]) -> str:
    """Under a simulated cohort the budget and target limit the simulated epsilon
    only, so the real guarantee is stated as a reported number, never as met."""
    if not plan.user.enabled:
        return "does not hold: privacy.user.enabled=false"
    if not plan.user.simulated:
        return ("holds for the released shared model: each device's whole update is clipped "
                "and the sum is noised, whatever the device computed")
    eps = last.get(K.USER_EPS)
    shown = "not reached: no round released" if eps is None else f"{eps:.4g}"
    return (f"the real run's user-level epsilon is user_level.final_epsilon "
            f"({shown}): reported, no target or budget applies to it. "
            "privacy.user.budget_epsilon and target_epsilon apply to the SIMULATED "
            "deployment (user_level_simulated) and limit only its epsilon")


def units_that_hold(plan: PrivacyPlan, last: dict[str, float] | None = None) -> dict[str, str]:
    """One line per unit; ``last`` is the final round's metrics."""
    photo = ("holds: every on-device parameter trained on the photos (personal part "
             "included) is trained by one DP-SGD with joint per-sample clipping"
             if plan.photo.enabled else "does not hold: privacy.photo.enabled=false")
    user = _user_unit(plan, last or {})
    caveat = _seed_caveat(plan)
    return {"photo": photo + (caveat if plan.photo.enabled else ""),
            "user": user + (caveat if plan.user.enabled else "")}


def noise_section(plan: PrivacyPlan) -> dict[str, str | None]:
    """Where the DP noise came from (``privacy.noise``), and whom it protects against."""
    if plan.noise == SECURE:
        return {"mode": plan.noise, "source": SECURE_SOURCE, "caveat": None}
    return {"mode": plan.noise, "source": SEEDED_SOURCE, "caveat": SEEDED_CAVEAT}


def _noise_trust(plan: PrivacyPlan) -> str:
    if plan.noise == SECURE:
        return (f"privacy.noise=secure: {SECURE_SOURCE}. torch's generator is a Mersenne "
                "Twister seeded with 64 OS bits, not a CSPRNG (docs/privacy.md).")
    return f"privacy.noise=seeded: {SEEDED_CAVEAT}"


def _photo_section(plan: PrivacyPlan, last: dict[str, float]) -> dict[str, Any]:
    p = plan.photo
    return {
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


def _user_section(plan: PrivacyPlan, last: dict[str, float]) -> dict[str, Any]:
    """The real run's user-level mechanism: never a simulated value, and under a
    simulation none of the limits (they belong to ``user_level_simulated``)."""
    m = plan.user.real_mechanism
    out = {
        "mechanism": "DP-FedAvg: clip each device's update of the device-trained shared "
                     "weights, equal-weight sum, Gaussian noise, fixed denominator",
        "sampling": m.sampling, "neighbouring_relation": m.relation,
        "accountant": m.accountant, "clip": m.clip, "noise_multiplier": m.noise_multiplier,
        "population": m.population, "cohort": m.cohort, "delta": m.delta,
        "noise_added_by": plan.user.noise_at,
    }
    if plan.user.simulated:
        out["limits"] = ("none: the budget and target apply to the SIMULATED deployment "
                         "(user_level_simulated)")
    else:
        out["noise_calibrated_for_target_epsilon"] = plan.user.target_epsilon
        out["budget_epsilon"] = plan.user.budget_epsilon or None
    return out | {"final_epsilon": last.get(K.USER_EPS)}


def _simulated_section(plan: PrivacyPlan, last: dict[str, float]) -> dict[str, Any]:
    m = plan.user.mechanism
    return {
        "note": "SIMULATION of a larger deployment: noise and accounting as if "
                f"{m.cohort} of {m.population} devices took part per round; not this run's "
                "guarantee (that is user_level.final_epsilon)",
        "noise_multiplier": m.noise_multiplier, "population": m.population,
        "cohort": m.cohort, "delta": m.delta,
        "noise_calibrated_for_target_epsilon": plan.user.target_epsilon,
        "budget_epsilon": plan.user.budget_epsilon or None,
        "final_epsilon": last.get(K.SIM_USER_EPS),
    }


def report(plan: PrivacyPlan, history: dict[int, dict[str, float]],
           stopped: str = "") -> dict[str, Any]:
    """The report as a JSON-able dict (``to_markdown`` renders it)."""
    last = _last_metrics(history)
    out: dict[str, Any] = {"noise": noise_section(plan), "units": units_that_hold(plan, last),
                           "stopped_early": stopped or None}
    if plan.photo.enabled:
        out["photo_level"] = _photo_section(plan, last)
    if plan.user.enabled:
        out["user_level"] = _user_section(plan, last)
        if plan.user.simulated:
            out["user_level_simulated"] = _simulated_section(plan, last)
    devices_noise = plan.user.enabled and plan.user.noise_at == DEVICES
    out["trust_assumptions"] = [
        _aggregation_trust(history, devices_noise),
        *([] if devices_noise else [SERVER_NOISE_TRUST]),
        DEVICE_NOISE_TRUST if devices_noise else DEVICE_TRUST,
        _noise_trust(plan),
        _sampling_trust(plan),
    ]
    out["treated_as_public"] = TREATED_AS_PUBLIC
    out["released_without_dp"] = RELEASED_WITHOUT_DP
    out["released_by_server_without_dp"] = RELEASED_BY_SERVER_WITHOUT_DP
    return out


SERVER_NOISE_TRUST = "The server is trusted to add the user-level noise."
DEVICE_TRUST = ("The server is trusted to sample devices as accounted; devices are trusted "
                "to run DP-SGD as instructed and to enforce their own budget.")
DEVICE_NOISE_TRUST = (
    "The server is trusted to sample devices as accounted and to tell the devices the "
    "accounted sigma and threshold (they check neither against the run's plan); devices are "
    "trusted to run DP-SGD as instructed, to enforce their own budget and to add their share "
    "of the "
    "user-level noise (privacy.user.noise_at=devices: each adds N(0, (sigma C)^2 / t) "
    "from its OS's CSPRNG before masking, t the threshold, so the server never sees the "
    "noiseless sum; a sum of fewer than t is never released, and a device that skips its "
    "noise lowers the noise of its round).")
SECURE_AGGREGATION_TRUST = (
    "Secure aggregation (aggregation.secure, SecAgg+ after Bell et al. 2020): each device "
    "clips its update to the bound, quantizes and masks it; the server holds no "
    "individual update in the clear and learns only the sum of the updates of the "
    "devices that finished the round (and which devices those were). This holds only "
    "against an honest-but-curious server, one that follows the protocol, and while "
    "fewer than the threshold of a device's neighbours give their shares away with it. "
    "Devices cannot authenticate each other's keys (no PKI of device keys) and there is "
    "no consistency-check round, so a server that deviates recovers any one device's "
    "update without a colluding device: by substituting its own public keys for a "
    "device's neighbours', or by sending devices different survivor lists at the "
    "unmask stage (split views; the default threshold, 3/4 of the shares, stops the "
    "split views found by search, not by proof). Closing both needs Bell et al.'s "
    "consistency check with signatures over a PKI of device keys. It changes nothing "
    "else: the server "
    "is still trusted {noise}to sample devices as "
    "accounted (it could draw a cohort of one real device and devices it controls, "
    "whose sum is that device's update), and cannot check any single update: a hostile "
    "device can send any field element, which may ruin the model, and a value chosen "
    "to make the modular sum wrap is detected only when the sum leaves the honest "
    "range (docs/privacy.md).")
NO_SECURE_AGGREGATION_TRUST = (
    "No secure aggregation: the server sees each device's individual update. That "
    "update is photo-level DP (when privacy.photo is on) but not user-level DP; "
    "user-level DP protects only the released aggregate and model.")


def _aggregation_trust(history: dict[int, dict[str, float]], devices_noise: bool = False
                       ) -> str:
    """A run under secure aggregation logs ``fleet/secagg_abandoned`` every round
    it trained."""
    secure = any(K.SECAGG_ABANDONED in m for m in history.values())
    if not secure:
        return NO_SECURE_AGGREGATION_TRUST
    return SECURE_AGGREGATION_TRUST.format(
        noise="" if devices_noise else "to add the user-level noise to the sum, ")


def _sampling_trust(plan: PrivacyPlan) -> str:
    """Whether the cohorts are secret: the user-level amplification by sampling
    assumes that who took part in a round is unknown to the adversary."""
    if plan.noise == SECURE:
        return ("Device sampling draws from the operating system's randomness; its generator "
                "state is never stored (a resume draws the rounds not yet released from a "
                "fresh seed). The ledger and per-round counts still reveal who took part "
                "when (released_by_server_without_dp).")
    return ("Device sampling is seeded from the run's seed (reproducible cohorts, exact "
            "resumes): a party that knows the seed knows who was drawn in each round, and "
            "against it the user-level epsilon's amplification by sampling does not apply.")


def _table(title: str, head: tuple[str, str], rows: dict[str, Any]) -> list[str]:
    lines = ["", f"## {title}", "", f"| {head[0]} | {head[1]} |", "|---|---|"]
    for key, value in rows.items():
        if isinstance(value, dict):
            value = "; ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"| {key} | {value} |")
    return lines


def to_markdown(data: dict[str, Any]) -> str:
    noise = data["noise"]
    lines = ["# Privacy report", "", f"**Noise:** {noise['mode']}: {noise['source']}."]
    if noise["caveat"]:
        lines += ["", f"**Caveat:** {noise['caveat']}"]
    lines += ["", "## Which units hold", ""]
    lines += [f"- **{unit}-level**: {text}" for unit, text in data["units"].items()]
    if data.get("stopped_early"):
        lines += ["", f"**Stopped early:** {data['stopped_early']}"]
    for section, title in SECTION_TITLES.items():
        if section in data:
            lines += _table(title, ("parameter", "value"), data[section])
    lines += ["", "## Trust assumptions", ""] + [f"- {t}" for t in data["trust_assumptions"]]
    lines += _table("Treated as public", ("input", "why it matters"), data["treated_as_public"])
    lines += _table("Released without DP: what else leaves a device", ("released", "DP"),
                    data["released_without_dp"])
    lines += _table("What the server releases outside DP", ("released", "what it weakens"),
                    data["released_by_server_without_dp"])
    return "\n".join(lines) + "\n"


def epsilon_chart(history: dict[int, dict[str, float]], plan: PrivacyPlan):
    """Epsilon against round for both units, each budget a dashed line in the
    colour of the series it limits."""
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted: list[float] = []
    # Under a simulated cohort the user budget limits the simulated series only.
    user_budget = plan.user.budget_epsilon if plan.user.enabled else 0.0
    real_budget, sim_budget = ((0.0, user_budget) if plan.user.simulated
                               else (user_budget, 0.0))
    series = [(K.PHOTO_EPS_MAX, "photo-level (max over devices)", plan.photo.budget_epsilon),
              (K.PHOTO_EPS_MEAN, "photo-level (mean)", 0.0),
              (K.USER_EPS, "user-level", real_budget),
              (K.SIM_USER_EPS, "user-level, SIMULATED deployment", sim_budget)]
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
