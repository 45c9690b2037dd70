"""drop-layers: which layers go, how much, and that the rest keep their weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from autoshrink.metrics import count_params
from autoshrink.technique import TrialContext
from autoshrink_plugins.depth import DropLayersOptions


def _drop(host, model, redundancy):
    return host.technique("drop-layers").apply(copy.deepcopy(model),
                                               DropLayersOptions(redundancy),
                                               TrialContext((3, 32, 32), 10))


def test_vgg16_loses_its_largest_same_shape_convolutions_up_to_the_share(host):
    """As in seed 001's lightweight VGG16: whole 512-channel convolutions, just enough."""
    redundancy = 0.25
    torch.manual_seed(0)
    model = host.model("vgg16").build(10, 3, 32)
    total = count_params(model)[0]
    light = _drop(host, model, redundancy)
    removed = total - count_params(light)[0]
    conv_512 = 512 * 512 * 9 + 512 + 2 * 512  # conv + its batch norm
    assert removed >= redundancy * total > removed - conv_512  # just enough, none extra
    assert removed % conv_512 == 0  # only whole 512->512 layers went
    kept = light.state_dict()
    for name, value in model.state_dict().items():  # every remaining layer keeps its weights
        if name in kept:
            assert torch.equal(kept[name], value)
    assert light(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # a share the network cannot give: every same-shape convolution goes (64, 128, 256, 512)
    lightest = _drop(host, model, 0.75)
    assert [c.out_channels for c in lightest.modules() if isinstance(c, nn.Conv2d)] == [
        64, 128, 256, 512]


def test_resnet_loses_identity_blocks_only(host):
    model = host.model("resnet18").build(10, 3, 16)
    light = _drop(host, model, 0.25)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        first = getattr(light, stage)[0]
        assert not isinstance(first, nn.Identity) or stage == "layer1"  # shortcuts kept
    assert sum(isinstance(m, nn.Identity) for m in light.modules()) > 1


def test_small_network_loses_what_it_can(host):
    model = host.model("smallcnn").build(10, 1, 16)
    light = _drop(host, model, 0.75)  # only Conv3 (32 -> 32) keeps its input's shape
    assert isinstance(light.features[6], nn.Identity)
    assert sum(isinstance(m, nn.Conv2d) for m in light.modules()) == 3


def test_width_rewrites_follow_drop_layers_through_its_identities(host):
    """The best plans of the default search narrow the stem and the last convolution of a
    small CNN that drop-layers made shallower (an identity where a layer was)."""
    ctx = TrialContext((1, 16, 16), 10)
    model = _drop(host, host.model("smallcnn").build(10, 1, 16), 0.75)
    for name in ("slim-stem", "slim-before-gap"):
        technique = host.technique(name)
        assert technique.applies_to(model) == (True, "")
        model = technique.apply(model, technique.Options(width=0.25), ctx)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_slim_stem_does_not_apply_once_the_first_shortcut_convolution_is_gone(host):
    """After narrow-bottleneck ResNet-50's first shortcut is a 64 -> 64 1x1 convolution, which
    drop-layers may remove; the stem then feeds the residual sum directly and slim-stem, which
    narrowed that convolution's input, must not be offered (it raised AttributeError)."""
    ctx = TrialContext((1, 32, 32), 10)
    narrow = host.technique("narrow-bottleneck")
    model = narrow.apply(host.model("resnet50").build(10, 1, 32), narrow.Options(divisor=4), ctx)
    light = host.technique("drop-layers").apply(model, DropLayersOptions(0.75), ctx)
    assert isinstance(light.layer1[0].downsample[0], nn.Identity)
    applies, reason = host.technique("slim-stem").applies_to(light)
    assert not applies and "adds the stem's output unchanged" in reason
