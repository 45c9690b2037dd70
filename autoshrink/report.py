"""Turns fronts and records into the files of the run folder and the printed tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from autoshrink.pareto import (
    LABELS,
    Front,
    StoppedTrial,
    TrialRecord,
    best_reduction,
    front_area,
    late_area_share,
)
from autoshrink.task import Baseline

COLUMNS = ("trial", "plan", "val_acc_%", "test_acc_%", "drop_pp", "params", "nonzero_params",
           "macs", "size_bytes", "latency_ms", "params_x", "macs_x", "size_x", "seconds")


def record_row(record: TrialRecord, baseline: Baseline) -> dict:
    return {
        "trial": record.number,
        "plan": record.plan,
        "val_acc_%": round(record.val_accuracy * 100, 2),
        "test_acc_%": None if record.test_accuracy is None else round(record.test_accuracy * 100,
                                                                      2),
        "drop_pp": round(record.drop_pp(baseline), 2),
        "params": record.params,
        "nonzero_params": record.nonzero_params,
        "macs": record.macs,
        "size_bytes": record.size_bytes,
        "latency_ms": round(record.latency_ms, 3),
        **reductions(record, baseline),
        "seconds": round(record.seconds, 2),
    }


def reductions(record: TrialRecord, baseline: Baseline) -> dict:
    """How many times fewer non-zero parameters and MACs, and how many times smaller a file,
    ``record``'s model has than ``baseline``."""
    return {
        "params_x": round(baseline.nonzero_params / max(record.nonzero_params, 1), 2),
        "macs_x": round(baseline.macs / max(record.macs, 1), 2),
        "size_x": round(baseline.size_bytes / max(record.size_bytes, 1), 2),
    }


def write_files(run_dir: Path, records: list[TrialRecord], fronts: list[Front],
                baseline: Baseline, max_drop: float,
                stopped: list[StoppedTrial] = ()) -> list[Path]:
    """trials.csv (every completed trial, with feasibility and the epochs it took from an
    interrupted run's checkpoints), pareto-<metric>.csv and, when trials failed or were
    aborted, stopped.csv with their reasons."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for record in records:
        row = record_row(record, baseline)
        row["feasible"] = record.feasible(baseline, max_drop)
        row["resumed_epochs"] = record.resumed_epochs
        rows.append(row)
    written = [run_dir / "trials.csv"]
    pd.DataFrame(rows, columns=[*COLUMNS, "feasible", "resumed_epochs"]).to_csv(written[0],
                                                                                index=False)
    for front in fronts:
        path = run_dir / f"pareto-{front.metric}.csv"
        pd.DataFrame([record_row(r, baseline) for r in front.members],
                     columns=list(COLUMNS)).to_csv(path, index=False)
        written.append(path)
    if stopped:
        written.append(run_dir / "stopped.csv")
        pd.DataFrame([vars(f) for f in stopped],
                     columns=["number", "plan", "state", "reason"]).to_csv(written[-1],
                                                                           index=False)
    return written


def format_stopped(stopped: list[StoppedTrial]) -> str:
    failed = sum(s.state == "failed" for s in stopped)
    lines = [f"{failed} failed trial(s) and {len(stopped) - failed} stopped early, with the"
             " reasons recorded on them:"]
    lines += [f"  trial {s.number} {s.state}: {s.reason}  [{s.plan}]" for s in stopped]
    return "\n".join(lines)


def format_baseline(baseline: Baseline) -> str:
    return (f"baseline: val acc {baseline.val_accuracy * 100:.2f}%, test acc"
            f" {baseline.test_accuracy * 100:.2f}%, {baseline.params:,} params,"
            f" {baseline.macs:,} MACs, {baseline.size_bytes:,} bytes,"
            f" {baseline.latency_ms:.2f} ms")


def area_figures(front: Front, baseline: Baseline, records: list[TrialRecord]) -> dict:
    """The front's area (autoshrink.pareto.front_area) and the share of it the last quarter of
    the completed trials added (None with too few trials or no area), as every report gives
    them."""
    late = late_area_share(records, front.metric, baseline, front.max_drop)
    return {"area": front_area(front, baseline),
            "late_area_share": None if late is None else {"trials": late[0], "share": late[1]}}


def area_sentence(front: Front, baseline: Baseline, records: list[TrialRecord]) -> str:
    """The front's area and how much of it the search's last trials added, in words."""
    figures = area_figures(front, baseline, records)
    said = (f"front area {figures['area']:.2f} (pp above the budget's floor x decades of"
            f" {LABELS[front.metric]} reduction)")
    late = figures["late_area_share"]
    if late is None:
        return said
    return (f"{said}; the last {late['trials']} of {len(records)} completed trials added"
            f" {late['share'] * 100:.1f} % of it")


def format_front(front: Front, baseline: Baseline, records: list[TrialRecord]) -> str:
    """A text table of one front with reduction factors against the baseline, and its area
    (see autoshrink.pareto.front_area) with the share the last trials added."""
    label = LABELS[front.metric]
    title = f"Pareto front: accuracy vs {label} (max drop {front.max_drop:g} pp)"
    if not front.members:
        return f"{title}\n  no trial meets the budget"
    table = pd.DataFrame([{
        "trial": r.number,
        "val acc %": f"{r.val_accuracy * 100:.2f}",
        "test acc %": "-" if r.test_accuracy is None else f"{r.test_accuracy * 100:.2f}",
        "drop pp": f"{r.drop_pp(baseline):.2f}",
        label: f"{r.metric(front.metric):,}",
        "params x": f"{baseline.nonzero_params / max(r.nonzero_params, 1):.1f}",
        "MACs x": f"{baseline.macs / max(r.macs, 1):.1f}",
        "size x": f"{baseline.size_bytes / max(r.size_bytes, 1):.1f}",
        "plan": r.plan,
    } for r in front.members])
    best = best_reduction(front, baseline)
    return (f"{title}; best {label} reduction {best:.1f}x\n" + text_table(table, "plan")
            + f"\n{area_sentence(front, baseline, records)}")


def text_table(table: pd.DataFrame, text_column: str, na_rep: str = "NaN") -> str:
    """``table`` as text with ``text_column`` last and left-aligned: pandas right-aligns text,
    which started the short plans of a front a hundred columns right of their figures, past a
    terminal's edge."""
    figures = table.drop(columns=text_column).to_string(index=False, na_rep=na_rep)
    return "\n".join(f"{line}  {text}" for line, text in
                     zip(figures.splitlines(), [text_column, *table[text_column]], strict=True))


def summary_json(fronts: list[Front], records: list[TrialRecord], baseline: Baseline,
                 max_drop: float) -> dict:
    return {
        "max_drop": max_drop,
        "baseline": {"val_accuracy": baseline.val_accuracy,
                     "test_accuracy": baseline.test_accuracy, "params": baseline.params,
                     "nonzero_params": baseline.nonzero_params, "macs": baseline.macs,
                     "size_bytes": baseline.size_bytes, "latency_ms": baseline.latency_ms},
        "trials": len(records),
        "feasible": sum(r.feasible(baseline, max_drop) for r in records),
        "fronts": {
            front.metric: {
                "best_reduction": best_reduction(front, baseline),
                **area_figures(front, baseline, records),
                "members": [record_row(r, baseline) for r in front.members],
            } for front in fronts
        },
    }

