"""Pareto fronts drawn as PNG: accuracy against one cost metric, as people judge a front.

Every completed trial is a point (within the budget in colour, over it in grey), the front is
the step line through its members, the baseline is a star and the budget a dashed line. Cost
axes are logarithmic because reductions are ratios.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no global state, no display backend
from matplotlib.ticker import NullFormatter

from autoshrink.pareto import Front, TrialRecord
from autoshrink.task import Baseline

AXIS_LABELS = {"params": "non-zero parameters", "flops": "MACs", "size": "artifact size (bytes)"}


def pareto_png(front: Front, records: list[TrialRecord], baseline: Baseline) -> bytes:
    """One front as PNG bytes."""
    figure = Figure(figsize=(6.4, 4.4), dpi=110)
    _draw(figure.subplots(), front, records, baseline)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw(axes, front: Front, records: list[TrialRecord], baseline: Baseline) -> None:
    metric = front.metric
    floor = baseline.val_accuracy * 100 - front.max_drop
    inside = [r for r in records if r.feasible(baseline, front.max_drop)]
    outside = [r for r in records if not r.feasible(baseline, front.max_drop)]
    bottom = max(0.0, min([floor - 5] + [r.val_accuracy * 100 for r in inside]))
    shown = [r for r in outside if r.val_accuracy * 100 >= bottom]
    below = [r for r in outside if r.val_accuracy * 100 < bottom]
    if outside:
        axes.scatter([r.metric(metric) for r in shown], [r.val_accuracy * 100 for r in shown],
                     s=18, color="#b8b8b8", label=f"over budget ({len(outside)})", zorder=2)
    if below:  # far below the budget: drawn on the bottom edge so the front keeps its scale
        axes.scatter([r.metric(metric) for r in below], [bottom] * len(below), marker="v",
                     s=24, color="#b8b8b8", clip_on=False, zorder=2,
                     label=f"  of which {len(below)} below the axis")
    axes.scatter([r.metric(metric) for r in inside], [r.val_accuracy * 100 for r in inside],
                 s=22, color="#4c72b0", label=f"within budget ({len(inside)})", zorder=3)
    if front.members:
        xs = [r.metric(metric) for r in front.members]
        ys = [r.val_accuracy * 100 for r in front.members]
        axes.step(xs, ys, where="post", color="#dd8452", linewidth=1.8, zorder=4,
                  label="Pareto front")
        axes.scatter(xs, ys, s=46, facecolors="none", edgecolors="#dd8452", linewidths=1.6,
                     zorder=5)
        for record, x, y in zip(front.members, xs, ys):
            axes.annotate(str(record.number), (x, y), textcoords="offset points",
                          xytext=(4, 4), fontsize=7, color="#8c4a1d")
    axes.scatter([baseline.metric(metric)], [baseline.val_accuracy * 100], marker="*", s=180,
                 color="#c44e52", zorder=6, label="baseline")
    axes.axhline(floor, linestyle="--", color="#c44e52", linewidth=1,
                 label=f"budget: {front.max_drop:g} pp below baseline")
    axes.set_xscale("log")
    axes.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on narrow spans
    axes.set_xlabel(f"{AXIS_LABELS[metric]} (log scale)")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_ylim(bottom, min(100.5, baseline.val_accuracy * 100 + 3))
    axes.set_title(f"accuracy vs {AXIS_LABELS[metric]}", fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")


def write_pareto_pngs(run_dir: Path, fronts: list[Front], records: list[TrialRecord],
                      baseline: Baseline) -> dict[str, Path]:
    """``pareto-<metric>.png`` per front; returns metric -> file."""
    written = {}
    for front in fronts:
        path = run_dir / f"pareto-{front.metric}.png"
        path.write_bytes(pareto_png(front, records, baseline))
        written[front.metric] = path
    return written
