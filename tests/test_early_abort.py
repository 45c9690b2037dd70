"""Early abort: a trial that cannot meet the budget stops part-way, recorded as pruned."""

from __future__ import annotations

import optuna
import pytest

from autoshrink.abort import ALLOWANCE, START, EarlyAbort
from autoshrink.config import build_config
from autoshrink.errors import TrialAborted
from autoshrink.plugins import PluginHost
from autoshrink.search import Search, open_study
from autoshrink.task import load_task


class ScriptedTrainer:
    """Answers accuracy() with the next scripted value."""

    def __init__(self, *values):
        self.values = list(values)

    def accuracy(self, model, split):
        return self.values.pop(0)


def test_checks_start_half_way_and_allow_less_towards_the_end():
    floor = 0.9
    monitor = EarlyAbort(ScriptedTrainer(floor - ALLOWANCE + 0.01, floor - 0.06), None, floor)
    monitor(None, 4, 10)  # before START: not even measured
    assert monitor.curve == [] and START == 0.5
    monitor(None, 5, 10)  # half-way: within the full allowance
    with pytest.raises(TrialAborted, match="epoch 9/10"):
        monitor(None, 9, 10)  # one epoch before the end, a fifth of the allowance (5 pp) is left
    monitor(None, 10, 10)  # a finished run is left to be measured
    assert [epoch for epoch, _, _ in monitor.curve] == [5, 9]
    with pytest.raises(TrialAborted, match="epoch 5/10"):
        EarlyAbort(ScriptedTrainer(floor - ALLOWANCE - 0.01), None, floor)(None, 5, 10)


@pytest.mark.parametrize("early_abort", [True, False])
def test_a_trial_that_cannot_learn_is_aborted_half_way(tmp_path, run_cli, early_abort):
    host = PluginHost.discover(explicit=("tests/faulty_plugin.py",))
    config = build_config(None, {"n_trials": 1, "out": str(tmp_path), "epochs": 12,
                                 "finetune_epochs": 6, "techniques": ("unlearning",),
                                 "early_abort": early_abort, "training_lengths": (1.0,)})
    study = open_study(config, load_task(config, host))
    study.enqueue_trial({"use.unlearning": True})
    trial = Search(config, host).run().trials[0]
    if not early_abort:  # trained to the end, measured, and infeasible
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert not trial.user_attrs["feasible"]
        return
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert "cannot plausibly reach the budget" in trial.user_attrs["aborted"]
    assert trial.constraints["accuracy_drop"] > 0  # the sampler sees it as infeasible
    assert trial.user_attrs["val_curve"][-1][0] == 3  # stopped at the first check: epoch 3/6
    assert trial.user_attrs["timing"]["training"] > 0
    code, out, err = run_cli("report", "--out", str(tmp_path), "--plugin",
                             "tests/faulty_plugin.py")
    assert code == 0, err
    assert "0 failed trial(s) and 1 stopped early" in out
    assert "aborted" in (tmp_path / "stopped.csv").read_text()
