"""Faults inside a trial fail that trial only, with the reason stored and reported."""

from __future__ import annotations

import logging

import optuna

from autoshrink.config import build_config
from autoshrink.plugins import PluginHost
from autoshrink.search import Search, count_distinct_finished, open_study
from autoshrink.task import load_task
from tests.faulty_plugin import FAULTS

PLUGIN = "tests/faulty_plugin.py"
EXPECTED = {
    "fault-raises": "ValueError: this plugin is broken",
    "fault-rewrite": "IndexError: this rewrite is broken",  # before, no reason, plan or log line
    # before, it read "interrupted: its worker stopped" and was queued again and again
    "fault-space": "fault-space's search_space raised KeyError: 'no such option table'",
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
