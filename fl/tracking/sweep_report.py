"""The report of a sweep: privacy-utility frontier and table, from MLflow.

The library half of ``python -m experiments.report`` (the command), here so that
the sweep callback (``fl.tracking.sweep``) can build it without ``fl`` importing
``experiments``. Reads the sweep's child runs (``fl.tracking.sweep``), and for each the final
quality (its objective metric) and the epsilons it spent in both units. Writes
``frontier.png`` (quality against photo-level and against user-level epsilon,
with the Pareto frontier) and ``sweep.md`` (one row per job) to ``--out``
(default ``reports/<sweep id>``), and logs both to the parent run as
``report/``. A multirun calls it on its own when it ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from fl.tracking import keys as K
from fl.tracking.mlflow_run import OBJECTIVE_TAG, quiet_mlflow
from fl.tracking.privacy_report import plt
from fl.tracking.sweep import OVERRIDES_TAG, ROLE_TAG, SWEEP_ID_TAG

UNITS = (("photo_eps", "photo-level epsilon (max over devices)"),  # Row field, axis label
         ("user_eps", "user-level epsilon"))


@dataclass
class Row:
    run_id: str
    overrides: str
    status: str
    objective: str
    quality: float
    before: float  # the objective at round 0: the starting model, before fine-tuning
    photo_eps: float
    user_eps: float
    # tracking.audit=true: observed photo-level lower bound and the theory at delta'
    audit_photo_lower: float = math.nan
    audit_photo_theory: float = math.nan


@dataclass
class Report:
    parent_run_id: str
    rows: list[Row]
    markdown_path: Path
    figure_path: Path


class ReportError(ValueError):
    pass


def _parent(client: mlflow.MlflowClient, ident: str):
    """The parent run, given its run id or the sweep id."""
    try:
        run = client.get_run(ident)
        if run.data.tags.get(ROLE_TAG) == "sweep":
            return run
    except mlflow.exceptions.MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=(
        f"tags.`{SWEEP_ID_TAG}` = '{ident}' and tags.`{ROLE_TAG}` = 'sweep'"), max_results=1)
    if not runs:
        raise ReportError(f"{ident!r} is neither a sweep id nor a sweep's parent run id in "
                          f"{client.tracking_uri}; a multirun prints its sweep id, and the "
                          "parent run is named sweep-<sweep id> in the MLflow UI")
    return runs[0]


def _rows(client: mlflow.MlflowClient, parent) -> list[Row]:
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    rows = []
    for run in sorted(children, key=lambda r: int(r.data.tags.get("fedface.job", 0))):
        m, tags = run.data.metrics, run.data.tags
        objective = tags.get(OBJECTIVE_TAG, K.SWAP_PSNR)
        start = [h.value for h in client.get_metric_history(run.info.run_id, objective)
                 if h.step == 0]
        rows.append(Row(run.info.run_id, tags.get(OVERRIDES_TAG, ""), run.info.status,
                        objective, m.get(objective, math.nan), start[0] if start else math.nan,
                        m.get(K.PHOTO_EPS_MAX, math.nan), m.get(K.USER_EPS, math.nan),
                        m.get(K.AUDIT_PHOTO_EPS_LOWER, math.nan),
                        m.get(K.AUDIT_PHOTO_EPS_THEORY, math.nan)))
    return rows


def short_labels(rows: list[Row]) -> list[str]:
    """Each job's overrides without those every job shares (what the sweep varied)."""
    tokens = [r.overrides.split() for r in rows]
    common = set.intersection(*map(set, tokens)) if tokens else set()
    return [" ".join(t for t in ts if t not in common) or r.run_id[:8]
            for ts, r in zip(tokens, rows)]


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto frontier of (epsilon, quality): no other point spends less and gets more."""
    best, out = -math.inf, []
    for eps, quality in sorted(p for p in points if not any(map(math.isnan, p))):
        if quality > best:
            out.append((eps, quality))
            best = quality
    return out


def _figure(rows: list[Row]):
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    objective = rows[0].objective
    labels = short_labels(rows)
    before = [r.before for r in rows if not math.isnan(r.before)]
    for ax, (attr, label) in zip(axes, UNITS):
        points = [(getattr(r, attr), r.quality) for r in rows]
        ax.scatter([x for x, _ in points], [y for _, y in points], color="tab:blue",
                   zorder=3)
        for text, (x, y) in zip(labels, points):
            if not (math.isnan(x) or math.isnan(y)):
                ax.annotate(text, (x, y), fontsize=7, textcoords="offset points",
                            xytext=(4, -10))
        front = frontier(points)
        if front:
            ax.step(*zip(*front), where="post", color="tab:orange", label="frontier")
        if before:
            ax.axhline(float(np.median(before)), color="grey", linestyle="--",
                       label="before fine-tuning")
        ax.legend(loc="best", fontsize=8)
        ax.set(xlabel=label, ylabel=objective, title=f"quality vs {label.split(' (')[0]}")
    figure.tight_layout()
    return figure


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def markdown(parent_run_id: str, sweep_id: str, rows: list[Row]) -> str:
    objective = rows[0].objective if rows else "quality"
    lines = [f"# Sweep {sweep_id}", "",
             (f"Parent MLflow run `{parent_run_id}`; {len(rows)} jobs. Quality is the final "
             f"`{objective}`; epsilons are the final values in each unit "
             "(`-`: that unit is off)."), "",
             (f"| job overrides | {objective} | before fine-tuning | photo eps (max) | "
             "user eps | status | run |"),
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.overrides or '-'} | {_fmt(r.quality)} | {_fmt(r.before)} | "
              f"{_fmt(r.photo_eps)} | {_fmt(r.user_eps)} | {r.status} | `{r.run_id}` |"
              for r in rows]
    audited = [r for r in rows if not math.isnan(r.audit_photo_lower)]
    if audited:  # jobs run with tracking.audit=true (docs/privacy.md "Empirical audit")
        lines += ["", ("Empirical audit (`tracking.audit=true`): the photo-level epsilon lower "
                       "bound observed by the one-run audit beside the accountant's epsilon, "
                       "both at `tracking.audit_delta`."), "",
                  "| job overrides | photo eps lower bound (observed) | photo eps (theory) |",
                  "|---|---|---|"]
        lines += [f"| {r.overrides or '-'} | {_fmt(r.audit_photo_lower)} | "
                  f"{_fmt(r.audit_photo_theory)} |" for r in audited]
    return "\n".join(lines) + "\n"


def build_report(tracking_uri: str, ident: str, out_dir: str | Path | None = None) -> Report:
    quiet_mlflow()
    client = mlflow.MlflowClient(tracking_uri)
    parent = _parent(client, ident)
    sweep_id = parent.data.tags.get(SWEEP_ID_TAG, parent.info.run_id)
    rows = _rows(client, parent)
    if not rows:
        raise ReportError(f"sweep {sweep_id} has no finished or started jobs in MLflow yet")
    out = Path(out_dir or Path("reports") / sweep_id)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "sweep.md"
    md_path.write_text(markdown(parent.info.run_id, sweep_id, rows))
    figure = _figure(rows)
    fig_path = out / "frontier.png"
    figure.savefig(fig_path, dpi=120)
    plt.close(figure)
    for path in (md_path, fig_path):
        client.log_artifact(parent.info.run_id, str(path), artifact_path="report")
    return Report(parent.info.run_id, rows, md_path, fig_path)
