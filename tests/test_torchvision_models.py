"""Techniques on models users bring from torchvision (``--model torchvision.models:NAME``):
those that cannot follow the model's structure say so instead of failing its trials."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from autoshrink.metrics import count_params
from autoshrink.technique import TrialContext

CONTEXT = TrialContext((3, 8, 8), 10)


def mobilenet_v3_small() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=10).eval()


def test_grouped_pointwise_then_prune_filters_on_mobilenet_v3(host):
    """Its squeeze-and-excitation 1x1 layers (16 -> 8 channels) made 8 groups of one output,
    which Torch-Pruning takes for depthwise: prune-filters failed with an IndexError."""
    grouped, pruning = host.techniques["grouped-pointwise"], host.techniques["prune-filters"]
    model = grouped.apply(mobilenet_v3_small(), grouped.Options(groups=8), CONTEXT)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1
             and m.kernel_size == (1, 1)]
    assert convs and all(conv.out_channels >= 2 * conv.groups for conv in convs)
    before = count_params(model)[0]
    model = pruning.apply(model, pruning.Options(ratio=0.4, criterion="bn-scale"), CONTEXT)
    assert count_params(model)[0] < before
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_width_rewrites_do_not_offer_themselves_for_blocks_they_cannot_follow(host):
    """MobileNet's features are blocks, not convolutions: slim-stem and slim-before-gap applied
    and failed with an IndexError; after no-fc, slim-before-gap's check itself raised."""
    model = mobilenet_v3_small()
    for name in ("slim-stem", "slim-before-gap"):
        ok, reason = host.techniques[name].applies_to(model)
        assert not ok and "plain features stack" in reason
    model = host.techniques["no-fc"].apply(model, None, CONTEXT)
    ok, reason = host.techniques["slim-before-gap"].applies_to(model)
    assert not ok and reason


class PooledTo2x2(nn.Module):
    """torchvision's VGG in small: features, pooled to a fixed grid, flattened, classified."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(16 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_no_fc_averages_each_class_over_the_grid_the_model_pools_to(host):
    """Before, the classifier became an identity: torchvision's VGG answered 490 numbers
    (10 classes x 7 x 7) instead of 10."""
    torch.manual_seed(0)
    model = host.techniques["no-fc"].apply(PooledTo2x2().eval(), None, CONTEXT)
    x = torch.randn(2, 3, 8, 8)
    class_maps = model.avgpool(model.features(x))  # 2 x 10 x 2 x 2
    assert torch.allclose(model(x), class_maps.mean((2, 3)))
    assert not hasattr(model, "pool")  # the model's own pooling is kept, not a new one added


def shufflenet_v2() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()


def test_int8_shufflenet_v2_runs_on_small_images(host):
    """It ends in ``x.mean([2, 3])``, which PyTorch's int8 kernel refused on 1x1 maps
    ("required rank 4 tensor to use channels_last format"): every int8 trial failed."""
    int8 = host.techniques["quantize-int8"]
    shape = (3, 32, 32)
    ctx = TrialContext(shape, 10,
                       calibration_fn=lambda n: (torch.randn(8, *shape) for _ in range(n)))
    model = shufflenet_v2()
    x = torch.randn(4, *shape)
    quantized = int8.apply(copy.deepcopy(model), int8.Options(calibration_batches=2,
                                                              observer="minmax"), ctx)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = quantized(x.contiguous(memory_format=layout))
        assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_prune_filters_declines_shufflenet_v2(host):
    """Torch-Pruning divided by zero building the graph of its reshaping shuffle, after the
    trial had trained."""
    ok, reason = host.techniques["prune-filters"].applies_to(shufflenet_v2())
    assert not ok and "ShuffleNetV2" in reason


def test_width_rewrites_pass_through_channel_wise_layers(host):
    """A user's VGG-style stack with other activations (before the plain-stack check it was
    accepted whatever it held)."""
    model = PooledTo2x2()
    model.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                                   nn.SiLU(), nn.Dropout2d(0.1), nn.Conv2d(16, 16, 3, padding=1),
                                   nn.LeakyReLU())
    for name in ("slim-stem", "slim-before-gap"):
        technique = host.techniques[name]
        assert technique.applies_to(model) == (True, "")
        model = technique.apply(model, technique.Options(width=0.5), CONTEXT)
    assert model.eval()(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def tiny_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_a_pruned_convnext_rebuilds_from_its_artifact(host, tmp_path, quantized):
    """prune-filters narrows ConvNeXt's layer norms and the layer scale each block holds, which
    the loader did not resize: every such trial's model failed to load (export, rebuilds)."""
    from autoshrink.plan import fixed_plan
    from autoshrink.testing import check_plan_rebuild

    names = ["prune-filters", "quantize-int8"] if quantized else ["prune-filters"]
    techniques = [host.techniques[name] for name in names]
    options = [technique.Options() for technique in techniques]
    model = tiny_convnext().eval()
    before = count_params(model)[0]
    pruned = check_plan_rebuild(fixed_plan(techniques, options), model, (3, 16, 16), tmp_path)
    assert quantized or count_params(pruned)[0] < 0.6 * before


@pytest.mark.parametrize("builder, names", [("mobilenet_v2", ("dwconv", "se")),
                                            ("resnet18", ("grouped-pointwise",))])
def test_rewrites_that_would_change_nothing_do_not_offer_themselves(host, builder, names):
    """MobileNetV2's only ordinary 3x3 convolution is its RGB stem, which dwconv leaves alone,
    and its features are blocks se cannot gate; ResNet-18's only 1x1 convolutions are in its
    shortcuts, which grouped-pointwise leaves whole. Offering them made plans that named them
    and did nothing."""
    model = getattr(torchvision.models, builder)(num_classes=10)
    for name in names:
        ok, reason = host.techniques[name].applies_to(model)
        assert not ok and reason, name
