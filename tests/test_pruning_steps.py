"""Iterative L1 pruning in a search keeps its last step within the budget: a step that takes the
model below the budget's floor is taken back and no further step runs, and the trial's plan
names the steps the model went through."""

from __future__ import annotations

import optuna
import pytest
import torch

from autoshrink.config import build_config
from autoshrink.plan import Plan, Step
from autoshrink.search import Search, open_study
from autoshrink.task import load_task
from autoshrink.technique import TrialContext
from autoshrink_plugins.pruning import PruneL1Options, prunable


def sparsity(model) -> float:
    weights = [module.weight for module, _ in prunable(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def pruned_with(host, options: PruneL1Options, accuracy=None, floor: float | None = 0.5):
    """smallcnn pruned by ``options`` under a validation ``accuracy`` of the model and the
    budget's ``floor`` (no fine-tuning: the steps' masks alone); also the context and the
    sparsities ``accuracy`` was asked about, in order."""
    torch.manual_seed(0)
    model = host.model("smallcnn").build(10, 1, 16).eval()
    asked = []

    def measured(candidate):
        asked.append(round(sparsity(candidate), 2))
        return accuracy(candidate)

    ctx = TrialContext((1, 16, 16), 10, accuracy_fn=measured if accuracy else None,
                       target_accuracy=floor)
    return host.technique("prune-l1").apply(model, options, ctx), ctx, asked


def accurate_below(limit: float):
    """An accuracy of 1 while at most ``limit`` of the weights are zero, else 0."""
    return lambda model: float(sparsity(model) <= limit)


def test_a_step_that_misses_the_budget_is_taken_back_and_ends_the_pruning(host):
    options = PruneL1Options(amount=0.3, steps=4)
    model, ctx, asked = pruned_with(host, options, accurate_below(0.5))
    assert asked == [0.3, 0.51]  # the third and fourth steps never ran
    assert sparsity(model) == pytest.approx(0.3, abs=1e-3)
    assert ctx.settled_options == {"prune-l1": PruneL1Options(amount=0.3, steps=1)}


def test_a_first_step_that_misses_the_budget_is_kept_and_ends_the_pruning(host):
    model, ctx, asked = pruned_with(host, PruneL1Options(amount=0.3, steps=4), lambda m: 0.0)
    assert asked == [0.3] and sparsity(model) == pytest.approx(0.3, abs=1e-3)
    assert ctx.settled_options == {"prune-l1": PruneL1Options(amount=0.3, steps=1)}


@pytest.mark.parametrize("accuracy, floor", [(accurate_below(0.9), 0.5),  # every step meets it
                                             (None, 0.5),  # no data: nothing to measure
                                             (lambda m: 0.0, None)])  # no budget
def test_every_step_runs_where_each_meets_the_budget_or_there_is_none(host, accuracy, floor):
    model, ctx, _ = pruned_with(host, PruneL1Options(amount=0.3, steps=4), accuracy, floor)
    assert sparsity(model) == pytest.approx(1 - 0.7**4, abs=1e-3)
    assert ctx.settled_options == {}


def test_a_plan_takes_the_options_a_technique_settled_on(host):
    prune, kmeans = host.technique("prune-l1"), host.technique("quantize-kmeans")
    plan = Plan((Step(prune, PruneL1Options(steps=5)), Step(kmeans, kmeans.Options())),
                training_length=0.5)
    settled = plan.with_options({"prune-l1": PruneL1Options(steps=2)})
    assert settled.steps[0].options.steps == 2 and settled.steps[1] == plan.steps[1]
    assert settled.training_length == 0.5 and plan.with_options({}) == plan


def test_a_search_records_the_steps_its_pruning_kept(host, tmp_path):
    """Six steps of half the weights each (98 % zeros) under a budget of one validation
    image: the pruning stops short, and the trial's plan and model say where."""
    config = build_config(None, {"n_trials": 1, "out": str(tmp_path), "max_drop": 0.5,
                                 "epochs": 12, "finetune_epochs": 1,
                                 "techniques": ("prune-l1",), "early_abort": False})
    study, _ = open_study(config, load_task(config, host))
    study.enqueue_trial({"use.prune-l1": True, "prune-l1.amount": 0.5, "prune-l1.steps": 6})
    trial = Search(config, host).run().trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("error")
    assert trial.user_attrs["sampled_plan_text"] == "prune-l1(amount=0.5, steps=6)"
    kept = Plan.from_json(trial.user_attrs["plan"], host.techniques).steps[0].options.steps
    assert kept < 6 and trial.user_attrs["plan_text"] == f"prune-l1(amount=0.5, steps={kept})"
    assert trial.params["prune-l1.steps"] == 6  # what the sampler chose stays its own
    metrics = trial.user_attrs["metrics"]
    assert metrics["nonzero_params"] / metrics["params"] == pytest.approx(0.5**kept, abs=0.01)


def test_each_step_reads_its_accuracy_from_its_fine_tune_instead_of_measuring_it_again(host):
    """A step's fine-tune (two epochs, keeping the better) measures validation after each
    epoch; the budget check after it takes the kept epoch's figure: two evaluations a step,
    not three."""
    from autoshrink.search import trial_context
    from autoshrink.train import Trainer

    task = load_task(build_config(None, {}), host)
    trainer = Trainer(task.splits, task.recipe)
    ctx = trial_context(task, trainer, seed=0, target_accuracy=0.0)
    measured, accuracy = [], trainer.accuracy
    trainer.accuracy = lambda model, split: measured.append(accuracy(model, split)) or measured[-1]
    options = PruneL1Options(steps=2, lr=0.05)  # from scratch: a rate at which it learns
    model = host.technique("prune-l1").apply(task.build_model(), options, ctx)
    assert len(measured) == 4 and ctx.settled_options == {}  # both steps ran
    assert ctx.finetuned_accuracy == max(measured[2:])  # the last step's kept epoch
    assert accuracy(model, task.splits.val) == pytest.approx(ctx.finetuned_accuracy, abs=0.01)
    assert ctx.finetuned_accuracy > 0.3  # it learned (chance: 0.1)
