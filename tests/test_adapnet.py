"""AdapNet (seed 002): soft pruning, merging, insertion and the phase's stopping rule."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from autoshrink.config import build_config
from autoshrink.metrics import count_params
from autoshrink.search import trial_context
from autoshrink.task import load_or_train_baseline, load_task
from autoshrink.train import Trainer
from autoshrink_plugins.adapnet import (
    AdapNetOptions,
    AdapNetRun,
    beta_at,
    insert_filter,
    insertion_scores,
    kse_indicator,
    uniformity_p_values,
)


@pytest.fixture(scope="module")
def trained(host):
    task = load_task(build_config(None, {"epochs": 12}), host)
    model, _ = load_or_train_baseline(task)
    return task, model


def _run(trained, **options):
    task, model = trained
    ctx = trial_context(task, Trainer(task.splits, task.recipe), seed=0)
    return AdapNetRun(copy.deepcopy(model), AdapNetOptions(**options), ctx)


def test_soft_pruned_filter_is_frozen_for_its_period_then_removed(trained):
    run = _run(trained, lsep=5)
    conv = run.model.features[0]
    run.layers[0].frozen = [3]
    before = conv.weight.detach().clone(), conv.bias.detach().clone()
    run._train_period(run.ctx.training_batches())
    assert torch.equal(conv.weight[3], before[0][3]) and torch.equal(conv.bias[3], before[1][3])
    assert not torch.equal(conv.weight[4], before[0][4])  # the others trained
    kept = torch.cat([conv.weight[:3], conv.weight[4:]]).detach().clone()
    assert run._remove_frozen(run.layers[0]) == 1
    assert run.model.features[0].out_channels == 15
    assert torch.equal(run.model.features[0].weight, kept)
    assert run.model.features[3].in_channels == 15  # the next layer no longer reads it


def test_inserted_filter_leaves_the_output_unchanged(trained):
    _, model = trained
    model = copy.deepcopy(model).eval()
    x = torch.randn(4, 1, 16, 16)
    before = model(x)
    for at in (0, 9):  # a convolution read by a convolution, and the last one (read by FC)
        weight = torch.randn_like(model.features[at].weight[0])
        insert_filter(model, at, weight, 0.1, master=0)
    assert model.features[0].out_channels == 17 and model.features[9].out_channels == 129
    assert torch.allclose(model(x), before, atol=1e-5)


def test_uniform_activity_is_a_pruning_candidate_and_concentrated_is_not():
    raw = torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p = uniformity_p_values(raw, observed=200)
    assert p[0] > 0.9 and p[1] < 1e-6 and p[2] == 1.0  # never fired counts as uniform


def test_insertion_scores_follow_algorithm_4():
    specialised = torch.eye(4)  # each filter codes one concept: no demand for a new filter
    p1, p2 = insertion_scores(specialised)
    assert (p1 < 0).all() and (p2 < 0).all()
    flat = torch.full((4, 4), 0.25)  # no concept stands out: too little mass in the active set
    assert insertion_scores(flat)[1].sum() > 0
    broad = torch.tensor([[0.3, 0.3, 0.3, 0.1]] * 4)  # 3 of 4 concepts active: too many
    assert insertion_scores(broad)[0].sum() > 0


def test_kse_indicator_is_scaled_to_the_layer_and_ranks_channels():
    torch.manual_seed(0)
    kernels = torch.randn(16, 3, 9)
    kernels[:, 1] = kernels[0, 1]  # every reader sees channel 1 through the same kernel
    indicator = kse_indicator(kernels)
    assert indicator.max() == 1.0 and (indicator > 0).all()
    assert np.argmax(indicator.numpy()) == 1


def test_beta_falls_by_the_papers_schedule():
    assert beta_at(0, 5) == 0.9 and beta_at(5, 5) == pytest.approx(0.84)
    assert beta_at(1000, 5) == 0.18


def test_structure_phase_shrinks_the_network_and_stops_by_the_rule(trained):
    run = _run(trained, lsep=10, max_periods=12, stop_pruned=3, stop_periods=2)
    before = count_params(run.model)[0]
    log = run.run()
    assert count_params(run.model)[0] < before
    assert sum(p.removed + p.merged for p in log) > 0
    quiet = [p.frozen + p.merged < 3 for p in log]
    assert len(log) == 12 or quiet[-2:] == [True, True]  # stopped at the cap or by the rule
    task = trained[0]
    assert run.model(task.splits.val.x[:4]).shape == (4, 10)
