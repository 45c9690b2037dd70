"""Plan sampling: whatever the sampler picks (every stage) builds, runs, respects the claims."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch

from autoshrink.plan import apply_stage, sample_plan
from autoshrink.technique import Stage, TrialContext

FAMILIES = [("smallcnn", (1, 16, 16)), ("vgg11", (3, 32, 32)), ("resnet18", (3, 16, 16)),
            ("resnet50", (3, 16, 16))]


@pytest.mark.parametrize("model_name, shape", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_random_plans_always_build_and_run(host, model_name, shape):
    torch.manual_seed(0)
    base = host.model(model_name).build(10, shape[0], shape[1]).eval()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        ctx = TrialContext(shape, 10)
        plan, model = sample_plan(trial, host.techniques, copy.deepcopy(base), ctx)
        for stage in (Stage.TRAINING, Stage.POST_TRAINING, Stage.QUANTIZATION):
            model = apply_stage(plan, stage, model.eval(), ctx)
        claims = [c for step in plan.steps for c in step.technique.claims]
        assert len(claims) == len(set(claims)), plan.describe()
        assert model.eval()(torch.randn(2, *shape)).shape == (2, 10), plan.describe()
        seen.add(plan.describe())
        study.tell(trial, 0.0)
    assert len(seen) > 6  # the sampler really explored different combinations
