"""Early abort: a trial that cannot meet the budget stops part-way, recorded as pruned."""

from __future__ import annotations

import optuna
import pytest
import torch

from autoshrink.abort import ALLOWANCE, DOUBT, START, EarlyAbort
from autoshrink.config import build_config
from autoshrink.data import Split
from autoshrink.errors import TrialAborted
from autoshrink.plugins import PluginHost
from autoshrink.search import Search, open_study
from autoshrink.task import load_task
from autoshrink.train import VALIDATION_PART


class ScriptedTrainer:
    """Answers accuracy() with the next scripted value, noting the size of each split asked."""

    def __init__(self, *values):
        self.values, self.asked = list(values), []

    def accuracy(self, model, split):
        self.asked.append(len(split))
        return self.values.pop(0)


def validation(samples: int) -> Split:
    return Split(torch.zeros(samples, 1, 2, 2), torch.zeros(samples, dtype=torch.long))


SMALL = validation(100)
PLAIN = torch.nn.Identity()  # no batch norm: a check measures it once


def test_checks_start_half_way_and_allow_less_towards_the_end():
    floor = 0.9
    monitor = EarlyAbort(ScriptedTrainer(floor - ALLOWANCE + 0.01, floor - 0.06), SMALL, floor)
    monitor(PLAIN, 4, 10)  # before START: not even measured
    assert monitor.curve == [] and START == 0.5
    monitor(PLAIN, 5, 10)  # half-way: within the full allowance
    with pytest.raises(TrialAborted, match="epoch 9/10"):
        monitor(PLAIN, 9, 10)  # one epoch before the end, a fifth of the allowance (5 pp) is left
    monitor(PLAIN, 10, 10)  # a finished run is left to be measured
    assert [epoch for epoch, _, _ in monitor.curve] == [5, 9]
    with pytest.raises(TrialAborted, match="epoch 5/10"):
        EarlyAbort(ScriptedTrainer(floor - ALLOWANCE - 0.01), SMALL, floor)(PLAIN, 5, 10)


def test_a_check_measures_part_of_a_large_split_unless_that_leaves_it_in_doubt():
    floor, large = 0.9, validation(VALIDATION_PART + 1000)
    line = floor - ALLOWANCE  # at the half
    doubt = DOUBT * 0.5 / VALIDATION_PART ** 0.5
    clearly_above = ScriptedTrainer(line + doubt + 0.01)
    EarlyAbort(clearly_above, large, floor)(PLAIN, 5, 10)
    assert clearly_above.asked == [VALIDATION_PART]
    clearly_below = ScriptedTrainer(line - doubt - 0.01)
    with pytest.raises(TrialAborted):
        EarlyAbort(clearly_below, large, floor)(PLAIN, 5, 10)
    assert clearly_below.asked == [VALIDATION_PART]
    # the part says just below the line, the whole split just above: the whole split decides
    in_doubt = ScriptedTrainer(line - doubt / 2, line + 0.001)
    monitor = EarlyAbort(in_doubt, large, floor)
    monitor(PLAIN, 5, 10)
    assert in_doubt.asked == [VALIDATION_PART, len(large)]
    assert monitor.curve == [(5, 10, line + 0.001)]
    # the part's accuracy, where the trainer measured it this epoch, is not measured again...
    given = ScriptedTrainer()
    with pytest.raises(TrialAborted):
        EarlyAbort(given, large, floor)(PLAIN, 5, 10, part_accuracy=line - doubt - 0.01)
    assert given.asked == []
    # ...but still leaves a doubtful decision to the whole split
    given_in_doubt = ScriptedTrainer(line + 0.001)
    EarlyAbort(given_in_doubt, large, floor)(PLAIN, 5, 10, part_accuracy=line - doubt / 2)
    assert given_in_doubt.asked == [len(large)]
    # on a split no larger than the part, the given figure is the whole split's
    small_given = ScriptedTrainer()
    with pytest.raises(TrialAborted):
        EarlyAbort(small_given, SMALL, floor)(PLAIN, 5, 10, part_accuracy=line - 0.001)
    assert small_given.asked == []


@pytest.mark.parametrize("early_abort", [True, False])
def test_a_trial_that_cannot_learn_is_aborted_half_way(tmp_path, run_cli, early_abort):
    host = PluginHost.discover(explicit=("tests/faulty_plugin.py",))
    config = build_config(None, {"n_trials": 1, "out": str(tmp_path), "epochs": 12,
                                 "finetune_epochs": 6, "techniques": ("unlearning",),
                                 "early_abort": early_abort, "training_lengths": (1.0,)})
    study, _ = open_study(config, load_task(config, host))
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


def test_a_model_whose_running_statistics_lag_is_measured_again_before_it_is_stopped(tmp_path):
    """Mid-run the running batch norm averages can lag the weights (a VGG-19 rewrite read 16.7 %
    with them and 99.0 % with measured ones, and was stopped); a model that did not learn is
    still stopped."""
    from torch import nn

    from autoshrink.train import Trainer

    config = build_config(None, {"out": str(tmp_path), "epochs": 3})
    task = load_task(config, PluginHost.discover())
    trainer = Trainer(task.splits, task.recipe)

    def network():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                             nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(32, 10))

    trained = trainer.fit(network(), epochs=3, lr=task.recipe.lr)
    floor = trainer.accuracy(trained, task.splits.val) - 0.05
    for layer in (m for m in trained.modules() if isinstance(m, nn.BatchNorm2d)):
        layer.running_mean += 3.0  # as if the weights had moved on since they were averaged
    assert trainer.accuracy(trained, task.splits.val) < floor - ALLOWANCE
    monitor = EarlyAbort(trainer, task.splits.val, floor)
    monitor(trained, 5, 10)  # not stopped
    assert monitor.curve[-1][2] >= floor
    with pytest.raises(TrialAborted):
        monitor(network(), 5, 10)  # untrained: below the line with measured statistics too


@pytest.mark.parametrize("patience", [None, 2])
def test_statistics_measured_on_all_training_images_before_the_check_are_not_measured_again(
        tmp_path, patience):
    """A model whose running averages always lag (momentum 0.01) has its statistics measured
    on the whole training split before each evaluation, the check's own or early stopping's
    (``patience``); a check below the line asked again with them measured on 2,048 images, a
    second pass that could not change the answer."""
    from torch import nn

    from autoshrink.train import Trainer

    config = build_config(None, {"out": str(tmp_path), "epochs": 2})
    task = load_task(config, PluginHost.discover())
    trainer = Trainer(task.splits, task.recipe)
    measured, measure = [], trainer.measure_statistics
    trainer.measure_statistics = lambda model, images=None: (measured.append(images),
                                                             measure(model, images))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.01),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    impossible = 1.5  # no accuracy reaches the floor: the check after epoch 1 of 2 stops it
    with pytest.raises(TrialAborted, match="after epoch 1/2"):
        trainer.fit(model, epochs=2, lr=task.recipe.lr, patience=patience,
                    monitor=EarlyAbort(trainer, task.splits.val, impossible))
    assert measured == [None]  # the trainer's own measurement on every training image
