"""A quantizer that takes a trained model below the budget runs again one bit finer
(autoshrink.finer_quantization), and a search records the plan as it ran."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch
from torch import nn

from autoshrink import artifact
from autoshrink.config import build_config
from autoshrink.export import rebuild
from autoshrink.finer_quantization import finer_plan, quantize_within_budget
from autoshrink.plan import Plan, Step
from autoshrink.plugins import PluginHost
from autoshrink.search import Search, open_study
from autoshrink.task import load_task
from autoshrink.technique import TrialContext
from autoshrink.testing import check_search_space
from autoshrink_plugins.weight_sharing import FixedPointOptions, KmeansOptions
from tests.coarse_quantizer import CoarseQuantizer, Levels

PLUGIN = "tests/coarse_quantizer.py"


def kmeans_plan(host, bits: int, length: float = 0.5) -> Plan:
    return Plan((Step(host.techniques["prune-l1"], host.techniques["prune-l1"].Options()),
                 Step(host.techniques["quantize-kmeans"], KmeansOptions(bits=bits))),
                training_length=length)


def bits_of(plan: Plan) -> int:
    return plan.steps[-1].options.bits


def test_the_weight_sharing_quantizers_get_one_bit_more_up_to_eight(host):
    kmeans = host.techniques["quantize-kmeans"]
    fixed_point = host.techniques["quantize-fixed-point"]
    assert kmeans.finer(KmeansOptions(bits=2, iterations=7)) == KmeansOptions(bits=3, iterations=7)
    assert kmeans.finer(KmeansOptions(bits=8)) is None
    assert fixed_point.finer(FixedPointOptions(bits=6, frac_bits=3)) == FixedPointOptions(
        bits=7, frac_bits=3)
    assert fixed_point.finer(FixedPointOptions(bits=8)) is None
    int8 = host.techniques["quantize-int8"]
    assert int8.finer(int8.Options()) is None


def test_a_finer_plan_raises_the_quantizer_only_and_keeps_fixed_options(host):
    plan = kmeans_plan(host, bits=2)
    finer = finer_plan(plan, {})
    assert bits_of(finer) == 3 and finer.training_length == 0.5
    assert finer.steps[0] == plan.steps[0]
    assert finer_plan(plan, {"quantize-kmeans": {"bits": 2}}) is None  # --set keeps it
    assert bits_of(finer_plan(plan, {"quantize-kmeans": {"iterations": 20}})) == 3
    assert finer_plan(kmeans_plan(host, bits=8), {}) is None
    assert finer_plan(Plan((plan.steps[0],)), {}) is None


def distinct_values_accuracy(needed: int):
    """An accuracy that is 1 when every weight layer has at least ``needed`` distinct values
    (or keeps all it had), else 0: coarse codebooks fail it, finer ones pass."""
    def accuracy(model: nn.Module) -> float:
        layers = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        return float(all(len(torch.unique(w)) >= min(needed, w.numel()) for w in layers))
    return accuracy


def search_context(accuracy, floor: float = 0.5) -> TrialContext:
    """A trial's context as a search gives it: validation accuracy and the budget's floor."""
    return TrialContext((1, 8, 8), 10, accuracy_fn=accuracy, target_accuracy=floor)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()


def test_a_quantizer_that_misses_the_budget_runs_finer_until_it_meets_it(host):
    calls = []
    accuracy = distinct_values_accuracy(16)
    result = quantize_within_budget(kmeans_plan(host, bits=2), small_model(),
                                    search_context(lambda m: calls.append(1) or accuracy(m)), {})
    assert bits_of(result.plan) == 4 and result.accuracy == 1.0
    for layer in (result.model[0], result.model[2]):  # 16 shared values: 4-bit k-means
        assert len(torch.unique(layer.weight)) == 16
    assert len(calls) == 4  # 2 bits, the model before it, 3 bits, 4 bits


def test_the_sampled_setting_stays_where_it_meets_the_budget_or_nothing_could(host):
    model = small_model()
    as_sampled = quantize_within_budget(kmeans_plan(host, bits=5), model,
                                        search_context(distinct_values_accuracy(16)), {})
    assert bits_of(as_sampled.plan) == 5 and as_sampled.model is model
    never = quantize_within_budget(kmeans_plan(host, bits=2), small_model(),
                                   search_context(lambda m: 0.0), {})
    assert bits_of(never.plan) == 2  # the model before quantization missed the budget too
    assert len(torch.unique(never.model[0].weight)) == 4
    finest = quantize_within_budget(kmeans_plan(host, bits=6), small_model(),
                                    search_context(distinct_values_accuracy(1000)), {})
    assert bits_of(finest.plan) == 8 and finest.accuracy == 0.0


def test_a_search_records_the_finer_plan_it_ran_and_reuses_it_for_a_repeat(tmp_path):
    host = PluginHost.discover(explicit=(PLUGIN,))
    config = build_config(None, {"n_trials": 2, "out": str(tmp_path), "epochs": 12,
                                 "techniques": ("coarse-quantizer",), "early_abort": False})
    task = load_task(config, host)
    study, _ = open_study(config, task)
    for _ in range(2):  # the second is a repeat of the first
        study.enqueue_trial({"use.coarse-quantizer": True, "coarse-quantizer.bits": 1},
                            skip_if_exists=False)
    first, repeat = Search(config, host).run().trials[:2]  # a third fills the second place
    assert first.state == optuna.trial.TrialState.COMPLETE and first.user_attrs["feasible"]
    assert first.user_attrs["plan_text"] == "coarse-quantizer(bits=3)"
    assert first.user_attrs["sampled_plan_text"] == "coarse-quantizer(bits=1)"
    assert first.params["coarse-quantizer.bits"] == 1  # what the sampler chose stays its own
    assert repeat.user_attrs["duplicate_of"] == 0
    assert repeat.user_attrs["plan_text"] == "coarse-quantizer(bits=3)"
    plan = Plan.from_json(first.user_attrs["plan"], host.techniques)
    state = artifact.load(tmp_path / "models" / "trial-0.pt")[0]
    model = rebuild(task.build_model(), plan, task.input_shape, 10, state)
    assert any(p.abs().sum() > 0 for p in model.parameters())  # the weights bits=3 kept
    assert dataclasses.asdict(plan.steps[0].options) == {"bits": 3}


@pytest.mark.parametrize("finer, message", [
    (lambda options: options, "not other"),  # the same options: no step finer
    (lambda options: {"bits": options.bits + 1}, "not other"),  # not its Options
    (lambda options: Levels(options.bits % 4 + 1), "past 64 steps"),  # round and round
])
def test_the_contract_check_refuses_a_finer_that_does_not_step_or_end(finer, message,
                                                                       monkeypatch):
    technique = CoarseQuantizer()
    monkeypatch.setattr(technique, "finer", finer)
    with pytest.raises(AssertionError, match=message):
        check_search_space(technique)
    check_search_space(CoarseQuantizer())  # its own finer steps to 4 bits and ends
