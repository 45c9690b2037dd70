"""Pareto fronts as plain data: accuracy (higher is better) against one cost metric.

Nothing here draws or prints; :mod:`autoshrink.report` does that.
"""

from __future__ import annotations

import dataclasses
import json
import math

import optuna

from autoshrink.storage import retries_of
from autoshrink.task import Baseline

METRICS = {"params": "nonzero_params", "flops": "macs", "size": "size_bytes"}
LABELS = {"params": "params", "flops": "MACs", "size": "size"}  # in tables and log lines


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One completed trial's measurements (accuracies in [0, 1])."""

    number: int
    plan: str
    plan_json: str
    val_accuracy: float
    params: int
    nonzero_params: int
    macs: int
    size_bytes: int
    latency_ms: float
    seconds: float  # with what interrupted runs of it had spent up to their last checkpoint
    test_accuracy: float | None = None
    resumed_epochs: int = 0  # taken from interrupted runs' checkpoints instead of trained

    def metric(self, name: str) -> float:
        return getattr(self, METRICS[name])

    def drop_pp(self, baseline: Baseline) -> float:
        return (baseline.val_accuracy - self.val_accuracy) * 100.0

    def feasible(self, baseline: Baseline, max_drop: float) -> bool:
        return self.drop_pp(baseline) <= max_drop + 1e-9


@dataclasses.dataclass(frozen=True)
class Front:
    metric: str
    max_drop: float
    members: tuple[TrialRecord, ...]  # sorted by the metric, smallest first


def records_from_study(study: optuna.Study) -> list[TrialRecord]:
    tests = {int(k): v for k, v in study.user_attrs.get("test_accuracy", {}).items()}
    records = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        measured = trial.user_attrs.get("metrics")
        if not measured:
            continue
        records.append(TrialRecord(number=trial.number, plan=trial.user_attrs.get("plan_text", ""),
                                   plan_json=trial.user_attrs.get("plan", "[]"),
                                   test_accuracy=tests.get(trial.number),
                                   resumed_epochs=trial.user_attrs.get("resumed_epochs", 0),
                                   **measured))
    return records


@dataclasses.dataclass(frozen=True)
class StoppedTrial:
    """A trial without results: ``state`` is "failed" or "aborted" (stopped early)."""

    number: int
    plan: str
    state: str
    reason: str


def stopped_from_study(study: optuna.Study) -> list[StoppedTrial]:
    """Failed and early-aborted trials with the reason stored on them (a failed trial with no
    reason was interrupted: its worker stopped)."""
    retried = retries_of(study)
    trials = study.get_trials(deepcopy=False)
    stopped = []
    for trial in trials:
        plan = trial.user_attrs.get("plan_text", "?")
        if trial.state == optuna.trial.TrialState.PRUNED and "aborted" in trial.user_attrs:
            stopped.append(StoppedTrial(trial.number, plan, "aborted",
                                        trial.user_attrs["aborted"]))
        elif trial.state == optuna.trial.TrialState.FAIL:
            reason = trial.user_attrs.get("error")
            if reason is None:
                again = retried.get(trial.number)
                reason = "interrupted: its worker stopped"
                if again is not None and trials[again].system_attrs.get("given_up"):
                    reason += f"; given up as trial {again}"
                elif again is not None:
                    reason += f"; queued again as trial {again}"
            stopped.append(StoppedTrial(trial.number, plan, "failed", reason))
    return stopped


def pareto_front(records: list[TrialRecord], metric: str, baseline: Baseline,
                 max_drop: float) -> Front:
    """Feasible trials that no other feasible trial beats on both accuracy and ``metric``."""
    feasible = [r for r in records if r.feasible(baseline, max_drop)]
    feasible.sort(key=lambda r: (r.metric(metric), -r.val_accuracy, r.number))
    members, best_accuracy = [], -1.0
    for record in feasible:  # ascending cost: keep each strict accuracy improvement
        if record.val_accuracy > best_accuracy:
            members.append(record)
            best_accuracy = record.val_accuracy
    return Front(metric, max_drop, tuple(members))


def best_reduction(front: Front, baseline: Baseline) -> float | None:
    """The largest reduction factor of the front's metric against the baseline."""
    if not front.members:
        return None
    smallest = front.members[0].metric(front.metric)
    return baseline.metric(front.metric) / max(smallest, 1)


def front_area(front: Front, baseline: Baseline) -> float:
    """The area the front dominates, in percentage points of accuracy above the budget's floor
    times decades of reduction (log10 of baseline / trial): the front's hypervolume against the
    baseline's cost at the floor, one number that grows with every trial that reaches further
    or keeps more accuracy, so two runs of one task can be compared by it."""
    floor = baseline.val_accuracy * 100 - front.max_drop
    cost = baseline.metric(front.metric)
    points = sorted(((r.val_accuracy * 100, math.log10(cost / max(r.metric(front.metric), 1)))
                     for r in front.members), reverse=True)  # the most accurate first
    area, reach = 0.0, 0.0
    for index, (accuracy, decades) in enumerate(points):  # slabs down to the next accuracy
        reach = max(reach, decades)
        lower = points[index + 1][0] if index + 1 < len(points) else floor
        area += max(0.0, accuracy - max(lower, floor)) * reach
    return area


def late_area_share(records: list[TrialRecord], metric: str, baseline: Baseline,
                    max_drop: float) -> tuple[int, float] | None:
    """How many trials the last quarter of the completed ones is, and the share of the front's
    area they added: a front still growing at the end of a search may reach further with more
    trials. None before there are four trials or while the front has no area."""
    if len(records) < 4:
        return None
    ordered = sorted(records, key=lambda r: r.number)
    late = math.ceil(len(ordered) / 4)
    whole = front_area(pareto_front(ordered, metric, baseline, max_drop), baseline)
    if whole <= 0:
        return None
    early = front_area(pareto_front(ordered[:-late], metric, baseline, max_drop), baseline)
    return late, 1.0 - early / whole


def baseline_from_study(study: optuna.Study) -> Baseline:
    return Baseline(**json.loads(study.user_attrs["baseline"]))
