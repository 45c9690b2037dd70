"""Faults inside a trial fail that trial only, with the reason stored and reported."""

from __future__ import annotations

import logging

import optuna

from autoshrink import hookimpl
from autoshrink.config import build_config
from autoshrink.plugins import PluginHost
from autoshrink.sampler import trial_seed
from autoshrink.search import Search, count_distinct_finished, open_study
from autoshrink.task import load_task
from tests.conftest import FAST
from tests.faulty_plugin import FAULTS

PLUGIN = "tests/faulty_plugin.py"
EXPECTED = {
    "fault-raises": "ValueError: this plugin is broken",
    "fault-rewrite": "IndexError: this rewrite is broken",  # before, no reason, plan or log line
    # before, it read "interrupted: its worker stopped" and was queued again and again
    "fault-space": "fault-space's search_space raised KeyError: 'no such option table'",
    "fault-undeclared-options": "fault-undeclared-options's search_space returned Amount, not"
                                " its Options (NoOptions); set Options on the class",
    "fault-returns-none": "fault-returns-none returned NoneType, not the model",  # read
    # "AttributeError: 'NoneType' object has no attribute 'eval'"
    "fault-casts-to-half": "after fault-casts-to-half, the model no longer runs on a float32"
                           " input of shape 1x1x16x16 (RuntimeError:",
    "fault-too-few-outputs": "after fault-too-few-outputs, the model returns (1, 5) for one"
                             " image, not (1, 10)",  # read "IndexError: Target 8 is out of bounds"
    "fault-freezes-everything": "the model to train has no trainable parameters (all 12 have"
                                " requires_grad=False)",
    "fault-nan-loss": "training diverged: loss is nan",
    "fault-out-of-memory": "out of memory: RuntimeError",
    "fault-export": "export failed: OSError: disk quota exceeded",
}


def test_each_fault_fails_only_its_trial_and_is_reported(tmp_path, run_cli, caplog):
    host = PluginHost.discover(explicit=(PLUGIN,))
    names = [t.name for t in FAULTS]
    config = build_config(None, {"n_trials": len(names) + 1, "out": str(tmp_path),
                                 "techniques": tuple(names), "epochs": 12,
                                 "finetune_epochs": 1, "training_lengths": (1.0,)})
    study, _ = open_study(config, load_task(config, host))
    for chosen in (*names, None):  # one trial per fault, then the plain baseline plan
        study.enqueue_trial({f"use.{n}": n == chosen for n in names}, skip_if_exists=False)
    caplog.set_level(logging.INFO, logger="autoshrink")
    study = Search(config, host).run()

    by_plan = {t.user_attrs["plan_text"]: t for t in study.trials}
    for name, reason in EXPECTED.items():
        trial = by_plan[name]
        assert trial.state == optuna.trial.TrialState.FAIL
        assert reason in trial.user_attrs["error"], trial.user_attrs["error"]
    assert by_plan["baseline"].state == optuna.trial.TrialState.COMPLETE  # the study went on
    assert count_distinct_finished(study) == len(names) + 1
    assert sum("FAILED" in r.message and r.levelno == logging.WARNING
               for r in caplog.records) == len(names)

    code, out, err = run_cli("report", "--out", str(tmp_path), "--plugin", PLUGIN)
    assert code == 0, err
    assert f"{len(names)} failed trial(s) and 0 stopped early" in out
    for reason in EXPECTED.values():
        assert reason in out and reason in (tmp_path / "stopped.csv").read_text()
    failed = by_plan["fault-raises"].number  # exporting it says why it has no model
    code, _, err = run_cli("export", "--out", str(tmp_path), "--plugin", PLUGIN, "--trial",
                           str(failed))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (f"trial {failed} of study 'digits-smallcnn' has no measured model (it failed:"
            f" ValueError: this plugin is broken") in err


class _FailingObserver:
    @hookimpl
    def trial_started(self, trial_number, plan):
        raise RuntimeError("dashboard push failed")


class _RecordingObserver:
    def __init__(self):
        self.started = []

    @hookimpl
    def trial_started(self, trial_number, plan):
        self.started.append(trial_number)


def test_an_observer_that_raises_is_warned_of_once_and_fails_nothing(tmp_path, caplog):
    host = PluginHost.discover()
    recording = _RecordingObserver()
    host.add(_FailingObserver(), "failing-observer")
    host.add(recording, "recording-observer")
    config = build_config(None, {"n_trials": 2, "n_jobs": 1, "out": str(tmp_path),
                                 "techniques": ("prune-l1",), "epochs": 12,
                                 "finetune_epochs": 1, "training_lengths": (1.0,),
                                 "timeout": 60})  # a limit, as it failed every trial and ran on
    caplog.set_level(logging.INFO, logger="autoshrink")
    study = Search(config, host).run()

    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert recording.started == [0, 1]  # the other observer was still told
    warnings = [r.message for r in caplog.records if "hook of plugin" in r.message]
    assert warnings == ["the trial_started hook of plugin 'failing-observer' raised"
                        " RuntimeError: dashboard push failed; the search goes on without it"
                        " (said once)"]


def test_an_error_outside_the_recorded_steps_fails_its_trial_which_counts(tmp_path,
                                                                          monkeypatch):
    import autoshrink.search

    def broken(*args, **kwargs):
        raise RuntimeError("a bug between the steps")

    monkeypatch.setattr(autoshrink.search, "trial_context", broken)
    config = build_config(None, {"n_trials": 3, "n_jobs": 1, "out": str(tmp_path),
                                 "techniques": ("prune-l1",), "epochs": 12,
                                 "finetune_epochs": 1, "timeout": 60})  # it ran without end
    study = Search(config, PluginHost.discover()).run()
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.FAIL
               and t.user_attrs["error"] == "RuntimeError: a bug between the steps"
               for t in study.trials)


def test_a_search_whose_trials_keep_failing_stops_and_says_why(tmp_path, run_cli, monkeypatch):
    """Failures in a row from a cause every trial shares stop the search with the reason and a
    non-zero exit, instead of failing every trial asked for (the first GPU search failed 422);
    one trial that does not fail starts the count again."""
    import autoshrink.search

    build = autoshrink.search.trial_context

    def broken_but_for_trial_3(task, trainer, seed, *args, **kwargs):
        if seed != trial_seed(0, 3):
            raise RuntimeError("a bug between the steps")
        return build(task, trainer, seed, *args, **kwargs)

    monkeypatch.setattr(autoshrink.search, "MAX_FAILURES_IN_A_ROW", 4)
    monkeypatch.setattr(autoshrink.search, "trial_context", broken_but_for_trial_3)
    code, out, err = run_cli("search", "--n-trials", "40", "--n-jobs", "1", "--out",
                             str(tmp_path), "--techniques", "prune-l1", *FAST)
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "autoshrink: error: the last 4 trials all failed, 4 of them with: RuntimeError: a bug"
        " between the steps; fix that and run the same command again (the study keeps its"
        " trials)")
    study = optuna.load_study(study_name="digits-smallcnn",
                              storage=f"sqlite:///{tmp_path}/study.db")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL] * 3 + [states[3]] + [
        optuna.trial.TrialState.FAIL] * 4
    assert states[3] != optuna.trial.TrialState.FAIL
    assert (tmp_path / "trials.csv").exists()  # the reports of what ran are still written
