"""The arithmetic the benchmark scripts report."""

from __future__ import annotations

import datetime

import optuna
import pytest

from benchmarks.default_search import overhead
from benchmarks.hypervolume import hypervolume


def test_hypervolume_of_a_staircase():
    # two non-dominated points and one dominated one, reference (0, 0)
    points = [(3.0, 1.0), (1.0, 2.0), (0.5, 0.5)]
    assert hypervolume(points, (0.0, 0.0)) == pytest.approx(3 * 1 + 1 * 1)
    assert hypervolume([], (0.0, 0.0)) == 0.0
    assert hypervolume([(1.0, -1.0)], (0.0, 0.0)) == 0.0  # below the reference: no area


def test_engine_overhead_counts_the_time_between_trials():
    # two trials 10 s long with 1 s between them; the measured parts add up to 18 s, so the
    # engine's share is the 3 s left of the 21 s loop, the gap included
    start = datetime.datetime(2026, 1, 1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for begin, parts in ((0, (7.0, 1.0, 0.5, 0.5)), (11, (8.0, 0.5, 0.0, 0.5))):
        training, evaluating, latency, techniques = parts
        timing = {"training": training, "evaluating": evaluating, "latency": latency,
                  "techniques": techniques, "total": 10.0}
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, trial_id=0, state=optuna.trial.TrialState.COMPLETE, value=None,
            values=[0.9, 100.0], datetime_start=start + datetime.timedelta(seconds=begin),
            datetime_complete=start + datetime.timedelta(seconds=begin + 10), params={},
            distributions={}, user_attrs={"timing": timing}, system_attrs={},
            intermediate_values={}))
    shares = overhead(study)
    assert shares["total"] == pytest.approx(21.0)
    assert shares["training"] == pytest.approx(15.0)
    assert shares["engine"] == pytest.approx(3.0)
