"""Plan sampling: whatever the sampler picks builds, runs and respects the claims."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch

from autoshrink.plan import sample_plan
from autoshrink.technique import Stage, TrialContext

FAMILIES = [("smallcnn", (1, 16, 16)), ("vgg11", (3, 32, 32)), ("resnet18", (3, 16, 16)),
            ("resnet50", (3, 16, 16))]


@pytest.mark.parametrize("model_name, shape", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_random_plans_always_build_and_run(host, model_name, shape):
    torch.manual_seed(0)
    base = host.model(model_name).build(10, shape[0], shape[1]).eval()
    architecture = {n: t for n, t in host.techniques.items() if t.stage is Stage.ARCHITECTURE}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        plan, model = sample_plan(trial, architecture, copy.deepcopy(base),
                                  TrialContext(shape, 10))
        claims = [c for step in plan.steps for c in step.technique.claims]
        assert len(claims) == len(set(claims)), plan.describe()
        assert model.eval()(torch.randn(2, *shape)).shape == (2, 10), plan.describe()
        seen.add(plan.describe())
        study.tell(trial, 0.0)
    assert len(seen) > 6  # the sampler really explored different combinations
