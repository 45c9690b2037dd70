"""Pyramid training (seed 000): block by block, similarity reduction at joins, stop at target."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autoshrink import artifact
from autoshrink.config import build_config
from autoshrink.search import trial_context
from autoshrink.task import load_task
from autoshrink.technique import TrialContext
from autoshrink.train import Trainer
from autoshrink_plugins.pyramid import PyramidOptions, reduce_by_similarity


@pytest.fixture(scope="module")
def digits(host):
    task = load_task(build_config(None, {"epochs": 4}), host)
    return task, Trainer(task.splits, task.recipe)


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _grow(host, digits, target, **options):
    task, trainer = digits
    ctx = trial_context(task, trainer, seed=0, target_accuracy=target)
    calls = []
    real = ctx.finetune_fn

    def recording(model, **kwargs):  # which weights each training run changed
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        real(model, **kwargs)
        calls.append({n for n, p in model.named_parameters() if not torch.equal(p, before[n])})
        return model

    ctx.finetune_fn = recording
    model = task.build_model()
    options = PyramidOptions(block_epochs=2, **options)
    return host.technique("pyramid").apply(model, options, ctx), calls, ctx


def test_reduced_network_joins_block_two_on_half_of_block_ones_maps(host, digits):
    """Table 3: Conv3 reads 16 of Conv2's 32 maps; the whole network is trained."""
    grown, calls, _ = _grow(host, digits, target=1.01, reduction=0.5)
    assert [(c.in_channels, c.out_channels) for c in _convs(grown)] == [
        (1, 16), (16, 16), (16, 32), (32, 128)]
    assert len(calls) == 2
    accuracy = digits[1].accuracy(grown, digits[0].splits.val)
    assert accuracy > 0.5  # it learned, block by block


def test_separate_variant_freezes_earlier_blocks_and_combined_trains_them(host, digits):
    _, separate, _ = _grow(host, digits, target=1.01, variant="separate", reduction=0.0)
    assert not any(name.startswith(("features.0.", "features.3.")) for name in separate[1])
    assert any(name.startswith("features.6.") for name in separate[1])
    _, combined, _ = _grow(host, digits, target=1.01, variant="combined", reduction=0.0)
    assert any(name.startswith("features.0.") for name in combined[1])


def test_growing_stops_at_the_block_that_meets_the_target(host, digits, tmp_path):
    full, calls, _ = _grow(host, digits, target=0.0, stop_at_target=False)
    assert len(calls) == 2 and len(_convs(full)) == 4
    grown, calls, ctx = _grow(host, digits, target=0.0)
    assert len(calls) == 1 and len(_convs(grown)) == 2  # Block 1 with its own FC head
    assert [m.out_features for m in grown.classifier if isinstance(m, nn.Linear)] == [128, 10]
    artifact.save(grown, tmp_path / "model.pt")
    rebuild_ctx = TrialContext(ctx.input_shape, 10,
                               saved_state=artifact.load_state_dict(tmp_path / "model.pt"))
    rebuilt = host.technique("pyramid").rebuild(digits[0].build_model(), PyramidOptions(),
                                                rebuild_ctx)
    artifact.load_into(rebuilt, tmp_path / "model.pt")
    x = digits[0].splits.val.x[:8]
    assert torch.allclose(rebuilt.eval()(x), grown.eval()(x), atol=1e-5)


def test_similarity_reduction_merges_identical_maps_without_changing_the_function(host):
    torch.manual_seed(0)
    model = host.model("smallcnn").build(10, 1, 16).eval()
    conv = model.features[3]  # Conv2: 16 -> 32 maps
    with torch.no_grad():
        conv.weight[7] = conv.weight[21]
        conv.bias[7] = conv.bias[21]
    x = torch.randn(16, 1, 16, 16)
    before = model(x)
    reduced = copy.deepcopy(model)
    reduce_by_similarity(reduced, 3, 31, "cosine", x)
    assert reduced.features[3].out_channels == 31 and reduced.features[6].in_channels == 31
    assert torch.allclose(reduced(x), before, atol=1e-5)
