"""``report.html``: one self-contained page per run folder, to look at or send to someone.

Images are embedded as data URIs and the style is inline, so the file opens anywhere, offline,
on its own. Every value that comes from a study is escaped.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from autoshrink.pareto import LABELS, Front, StoppedTrial, TrialRecord, best_reduction
from autoshrink.report import area_figures, record_row
from autoshrink.task import Baseline

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
tr.over td { color: #999; } tr.front td { background: #fff4ea; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots figure { margin: 0; width: calc(50% - 0.5em); min-width: 320px; }
.plots img { width: 100%; height: auto; }
.wide { overflow-x: auto; }
.muted { color: #777; }
"""


def write_report_html(path: Path, *, study_name: str, settings: dict, baseline: Baseline,
                      records: list[TrialRecord], fronts: list[Front], max_drop: float,
                      stopped: list[StoppedTrial], plots: dict[str, bytes],
                      environments: dict[str, dict]) -> Path:
    front_numbers = {r.number for front in fronts for r in front.members}
    sections = [
        f"<h1>autoshrink study {_e(study_name)}</h1>",
        f"<p class=muted>written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC;"
        f" {len(records)} completed trials, {sum(r.feasible(baseline, max_drop) for r in records)}"
        f" within the budget of {max_drop:g} pp below the baseline's validation accuracy.</p>",
        "<h2>Pareto fronts</h2>", _fronts_summary(fronts, baseline, records),
        '<div class="plots">' + "".join(
            f'<figure><img alt="accuracy vs {_e(LABELS[metric])}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}"></figure>' for metric, png in plots.items())
        + "</div>",
        "<h2>Baseline</h2>", _baseline_table(baseline),
        "<h2>Trials</h2>",
        "<p class=muted>Grey rows are over the budget; shaded rows are on a front. Test"
        " accuracy is measured for front members only.</p>",
        _trials_table(records, baseline, max_drop, front_numbers),
    ]
    if stopped:
        sections += ["<h2>Failed and stopped trials</h2>", _table(
            ["trial", "state", "reason", "plan"],
            [[s.number, s.state, s.reason, s.plan] for s in stopped], text_columns={1, 2, 3})]
    sections += ["<h2>Search settings</h2>", _settings_table(settings),
                 "<h2>Software and hardware</h2>", _environment_tables(environments)]
    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>autoshrink: {_e(study_name)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path


def _e(value) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], text_columns: set[int] = frozenset(),
           row_classes: list[str] | None = None) -> str:
    def cell(tag: str, index: int, value) -> str:
        kind = ' class="text"' if index in text_columns else ""
        shown = "" if value is None else (f"{value:,}" if isinstance(value, int)
                                          and not isinstance(value, bool) else value)
        return f"<{tag}{kind}>{_e(shown)}</{tag}>"

    classes = row_classes or [""] * len(rows)
    head = "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"
    body = "".join((f'<tr class="{kind}">' if kind else "<tr>")
                   + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>"
                   for kind, row in zip(classes, rows))
    return f"<table>{head}{body}</table>"


def _fronts_summary(fronts: list[Front], baseline: Baseline,
                    records: list[TrialRecord]) -> str:
    rows = []
    for front in fronts:
        best = best_reduction(front, baseline)
        figures = area_figures(front, baseline, records)
        late = figures["late_area_share"]
        smallest = front.members[0] if front.members else None
        rows.append([LABELS[front.metric], len(front.members),
                     "-" if best is None else f"{best:.1f}x",
                     f"{figures['area']:.2f}",
                     "-" if late is None
                     else f"{late['share'] * 100:.1f} % (last {late['trials']})",
                     "-" if smallest is None else smallest.number,
                     "-" if smallest is None else f"{smallest.drop_pp(baseline):.2f}",
                     "-" if smallest is None else smallest.plan])
    return _table(["metric", "members", "best reduction", "area (pp x decades)",
                   "of it added by the last trials", "by trial", "its drop (pp)", "plan"],
                  rows, text_columns={0, 7})


def _baseline_table(baseline: Baseline) -> str:
    return _table(["val acc %", "test acc %", "params", "non-zero params", "MACs", "bytes",
                   "latency ms", "training s"],
                  [[f"{baseline.val_accuracy * 100:.2f}", f"{baseline.test_accuracy * 100:.2f}",
                    baseline.params, baseline.nonzero_params, baseline.macs,
                    baseline.size_bytes, f"{baseline.latency_ms:.3f}",
                    f"{baseline.train_seconds:.1f}"]])


def _trials_table(records: list[TrialRecord], baseline: Baseline, max_drop: float,
                  front_numbers: set[int]) -> str:
    frame = pd.DataFrame([record_row(r, baseline) for r in records])
    if frame.empty:
        return "<p>No completed trials.</p>"
    classes = ["front" if r.number in front_numbers else
               ("" if r.feasible(baseline, max_drop) else "over") for r in records]
    frame = frame[[c for c in frame.columns if c != "plan"] + ["plan"]]  # long text last
    rows = [[None if pd.isna(v) else v for v in row]
            for row in frame.astype(object).itertuples(index=False)]
    table = _table(list(frame.columns), rows, text_columns={len(frame.columns) - 1},
                   row_classes=classes)
    return f'<div class="wide">{table}</div>'


def _settings_table(settings: dict) -> str:
    return _table(["setting", "value"], _flat(settings), text_columns={0, 1})


def _flat(settings: dict, prefix: str = "") -> list[list]:
    """Nested settings (the recipe, held options) as dotted keys."""
    rows = []
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append([prefix + key, json.dumps(value) if isinstance(value, (dict, list, tuple))
                         else value])
    return rows


def _environment_tables(environments: dict[str, dict]) -> str:
    if not environments:
        return "<p>Not recorded (the study predates environment recording).</p>"
    parts = []
    for host, described in environments.items():
        parts.append(f"<h3>{_e(host)}</h3>")
        rows = [[k, v] for k, v in {**described["hardware"], **described["versions"]}.items()]
        parts.append(_table(["", ""], rows, text_columns={0, 1}))
    return "".join(parts)
