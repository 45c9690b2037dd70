"""What ``search`` and ``report`` do with a finished study: fronts, test accuracy, files."""

from __future__ import annotations

import dataclasses
import logging

import optuna

from autoshrink import environment
from autoshrink.config import SearchConfig
from autoshrink.html_report import write_report_html
from autoshrink.pareto import (
    baseline_from_study,
    pareto_front,
    records_from_study,
    stopped_from_study,
)
from autoshrink.plots import write_pareto_pngs
from autoshrink.plugins import PluginHost
from autoshrink.report import (
    format_baseline,
    format_front,
    format_stopped,
    summary_json,
    write_files,
)
from autoshrink.search import measure_test_accuracy
from autoshrink.task import Task, weak_baseline_warning

log = logging.getLogger(__name__)


def finish(study: optuna.Study, config: SearchConfig, task: Task, host: PluginHost,
           as_json: bool, weak_baseline_said: bool = False) -> dict:
    """Measure the fronts' test accuracy, write the run folder's files, print the tables
    (unless ``as_json``) and return the JSON summary, all at the study's budget; warn of a
    baseline its trials beat by more than the budget unless the search said so already."""
    max_drop = config.budget
    baseline = baseline_from_study(study)
    fronts = [pareto_front(records_from_study(study), m, baseline, max_drop)
              for m in ("params", "flops", "size")]
    for number, reason in measure_test_accuracy(study, fronts, task, host,
                                                config.run_dir).items():
        log.warning(f"no test accuracy for trial {number}: {reason}")
    records = records_from_study(study)  # now with test accuracies
    fronts = [pareto_front(records, m, baseline, max_drop) for m in ("params", "flops", "size")]
    best = max(records, key=lambda r: r.val_accuracy, default=None)
    weak = best and weak_baseline_warning(baseline.val_accuracy, best.val_accuracy, best.number,
                                          len(task.splits.val), max_drop, task.recipe.epochs)
    if weak and not weak_baseline_said:
        log.warning(weak)
    stopped = stopped_from_study(study)
    written = write_files(config.run_dir, records, fronts, baseline, max_drop, stopped)
    pictures = write_pareto_pngs(config.run_dir, fronts, records, baseline)
    written += [*pictures.values(), write_report_html(
        config.run_dir / "report.html", study_name=study.study_name,
        settings=dataclasses.asdict(config), baseline=baseline, records=records, fronts=fronts,
        max_drop=max_drop, stopped=stopped,
        plots={metric: path.read_bytes() for metric, path in pictures.items()},
        environments=environment.recorded(study))]
    payload = summary_json(fronts, records, baseline, max_drop)
    payload["stopped"] = [dataclasses.asdict(s) for s in stopped]
    payload["study"] = {"name": study.study_name, "storage": config.storage_url,
                        "run_dir": str(config.run_dir)}
    if not as_json:
        print(format_baseline(baseline))
        print(f"{len(records)} completed trials,"
              f" {sum(r.feasible(baseline, max_drop) for r in records)} within"
              f" {max_drop:g} pp")
        for front in fronts:
            print()
            print(format_front(front, baseline, records))
        if stopped:
            print()
            print(format_stopped(stopped))
    log.info(f"wrote {', '.join(str(p) for p in written)}")
    return payload
