"""Every registered technique, driven from the live registry (new ones are tested automatically)."""

from __future__ import annotations

import copy

import pytest
import torch

from autoshrink.metrics import count_params
from autoshrink.plan import Plan, Step, apply_stage
from autoshrink.technique import Stage, TrialContext

SHAPE = (1, 16, 16)


def _techniques():
    from autoshrink.plugins import PluginHost

    return sorted(PluginHost.discover().techniques.items())


@pytest.fixture
def model(host):
    torch.manual_seed(0)
    return host.model("smallcnn").build(10, 1, 16)


@pytest.mark.parametrize("name, technique", _techniques(), ids=lambda v: getattr(v, "name", v))
def test_technique_runs_on_smallcnn(model, name, technique):
    ok, reason = technique.applies_to(model)
    assert ok, reason
    ctx = TrialContext(SHAPE, 10)
    before_params, before_nonzero = count_params(model)
    changed = technique.apply(copy.deepcopy(model).eval(), technique.Options(), ctx)
    out = changed(torch.randn(4, *SHAPE))
    assert out.shape == (4, 10)
    if technique.stage is Stage.ARCHITECTURE:
        changed.train()
        loss = changed(torch.randn(4, *SHAPE)).logsumexp(1).mean()
        loss.backward()
        grads = [p.grad for p in changed.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        after_params, _ = count_params(changed)
        assert after_params < before_params, f"{name} did not reduce parameters"
    if technique.stage is Stage.POST_TRAINING:
        assert count_params(changed)[1] < before_nonzero, f"{name} left every weight non-zero"


@pytest.mark.parametrize("name, technique", _techniques(), ids=lambda v: getattr(v, "name", v))
def test_rebuild_gives_a_model_that_loads_the_weights(model, name, technique):
    ctx = TrialContext(SHAPE, 10)
    plan = Plan((Step(technique, technique.Options()),))
    trained = copy.deepcopy(model)
    rebuilt = copy.deepcopy(model)
    for stage in Stage:
        trained = apply_stage(plan, stage, trained.eval(), ctx)
        rebuilt = apply_stage(plan, stage, rebuilt.eval(), ctx, rebuild=True)
    rebuilt.load_state_dict(trained.state_dict())
    x = torch.randn(2, *SHAPE)
    assert torch.allclose(rebuilt(x), trained(x), atol=1e-5)


def test_dwconv_inherits_a_rank_one_approximation(host):
    """The depthwise-separable pair reproduces a kernel that is exactly rank one per channel."""
    from autoshrink_plugins.convolution import separable_from

    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        depth = torch.randn(8, 1, 3, 3)
        point = torch.randn(16, 8)
        conv.weight.copy_(point[:, :, None, None] * depth[:, 0][None])
    pair = separable_from(conv)
    x = torch.randn(2, 8, 10, 10)
    assert torch.allclose(pair(x), conv(x), atol=1e-4)
