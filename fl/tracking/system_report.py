"""System figures of a run: wall time per round and device updates per second.

They answer "where did the time go?" next to the privacy and quality charts:
a slow round is a straggler or a big cohort, a falling update rate is the
machine, not the method.
"""

from __future__ import annotations

from matplotlib.ticker import MaxNLocator

from fl.tracking import keys as K
from fl.tracking.privacy_report import plt


def system_chart(history: dict[int, dict[str, float]]):
    rounds = [r for r in sorted(history) if K.ROUND_SECONDS in history[r]]
    figure, (time_ax, rate_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    time_ax.bar(rounds, [history[r][K.ROUND_SECONDS] for r in rounds], color="tab:blue")
    time_ax.set(xlabel="round", ylabel="seconds", title="wall time per round")
    rate_ax.plot(rounds, [history[r].get(K.UPDATES_PER_SECOND, float("nan")) for r in rounds],
                 marker="o", color="tab:green")
    rate_ax.set(xlabel="round", ylabel="updates / s", title="device updates per second",
                ylim=(0, None))
    for ax in (time_ax, rate_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return figure
