"""Width rewrites from seed 003 (Sec. II, III-A e)-f), Table I no. 6, 8, 9).

- ``slim-stem``: fewer filters in the first convolution (MobileNetV3's observation that the stem
  needs few filters); its consumers are narrowed to match.
- ``slim-before-gap``: a narrower final feature map before global pooling: the last convolution
  of a plain stack, or the residual width of a ResNet's last stage.
- ``narrow-bottleneck``: MobileNetV2-style narrow links between ResNet bottlenecks; the paper
  turns 256/512/1024/2048 into 10/22/42/86 (``divisor`` 24 gives 11/21/43/85; ``links`` sets
  them exactly). The paper also added an expansion back to 2048 before the classifier in its
  experiment 6; we do not (``slim-before-gap`` plays that role), so our counts for the columns
  that include it are lower than the paper's.
Kept channels are the strongest filters of the trained layer (largest L1 norm), so the rewrites
start from the baseline's weights; a stage narrowed by more than half retrains fully.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from autoshrink import Stage, Technique, hookimpl
from autoshrink.errors import OptionError
from autoshrink.technique import check_range
from autoshrink_plugins.rewrite import (
    PLAIN_LAYERS,
    plain_units,
    select_bn,
    select_in,
    select_linear_in,
    select_out,
    strongest_filters,
)


@dataclasses.dataclass(frozen=True)
class WidthOptions:
    """The kept fraction of a layer's channels."""

    width: float = 0.5
    technique: ClassVar[str] = "slim-stem"

    def __post_init__(self):
        check_range(self.technique, "width", self.width, 0.05, 0.95)


class PreGapWidthOptions(WidthOptions):
    technique = "slim-before-gap"


def _keep(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _is_resnet(model: nn.Module) -> bool:
    return all(hasattr(model, n) for n in ("conv1", "bn1", "layer1", "layer4", "fc"))


# layers that keep each channel to itself, which the narrowing passes through: the identities
# drop-layers leaves, and the activations and pooling of user models
CHANNELWISE = (nn.Identity, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish,
               nn.Dropout2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _plain_convs(model: nn.Module) -> int:
    """How many convolutions ``model``'s plain features stack has (0: it has none, or its
    features are blocks, such as MobileNet's, whose channels these rewrites cannot follow)."""
    return len(plain_units(model, PLAIN_LAYERS + CHANNELWISE) or [])


def narrow_stack_conv(model: nn.Module, position: int, width: float) -> None:
    """Narrow the ``position``-th conv of a plain features stack and what reads its output."""
    features = model.features
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    at = convs[position]
    conv = features[at]
    index = strongest_filters(conv, _keep(conv.out_channels, width))
    features[at] = select_out(conv, index)
    for later in range(at + 1, len(features)):
        layer = features[later]
        if isinstance(layer, nn.BatchNorm2d):
            features[later] = select_bn(layer, index)
        elif isinstance(layer, nn.Conv2d):
            features[later] = select_in(layer, index)
            return
    first_linear = next(i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear))
    model.classifier[first_linear] = select_linear_in(model.classifier[first_linear], index,
                                                      conv.out_channels)


def _last(block: nn.Module) -> tuple[str, str]:
    return ("conv3", "bn3") if isinstance(block, Bottleneck) else ("conv2", "bn2")


def narrow_stage_output(stage: nn.Sequential, keep: int) -> torch.Tensor:
    """Narrow the residual stream of one ResNet stage to ``keep`` channels; returns them."""
    blocks = list(stage)
    norms = sum(getattr(b, _last(b)[0]).weight.detach().abs().flatten(1).sum(1) for b in blocks)
    index = norms.topk(keep).indices.sort().values
    for number, block in enumerate(blocks):
        conv_name, bn_name = _last(block)
        setattr(block, conv_name, select_out(getattr(block, conv_name), index))
        setattr(block, bn_name, select_bn(getattr(block, bn_name), index))
        if block.downsample is not None:
            block.downsample[0] = select_out(block.downsample[0], index)
            block.downsample[1] = select_bn(block.downsample[1], index)
        if number > 0:
            block.conv1 = select_in(block.conv1, index)
    return index


def narrow_stage_input(stage: nn.Sequential, index: torch.Tensor) -> None:
    first = stage[0]
    first.conv1 = select_in(first.conv1, index)
    if first.downsample is not None:
        first.downsample[0] = select_in(first.downsample[0], index)


class SlimStem(Technique):
    name = "slim-stem"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"stem"})
    Options = WidthOptions
    order = 5
    paper = "seed 003, Sec. II (fewer early channels), Table I no. 9"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if _is_resnet(model):
            block = model.layer1[0]
            # drop-layers may have emptied the shortcut: a 1x1 convolution that kept its width
            # (after narrow-bottleneck) is as removable as any same-width layer
            if isinstance(block, (Bottleneck, BasicBlock)) and block.downsample is not None \
                    and isinstance(block.downsample[0], nn.Conv2d):
                return True, ""
            return False, ("the first ResNet block adds the stem's output unchanged (no"
                           " downsample convolution)")
        if _plain_convs(model) >= 2:
            return True, ""
        return False, "needs a ResNet or a plain features stack with at least two convolutions"

    def search_space(self, trial) -> WidthOptions:
        return WidthOptions(width=trial.suggest_categorical("width", [0.25, 0.5]))

    def apply(self, model: nn.Module, options: WidthOptions, ctx) -> nn.Module:
        if not _is_resnet(model):
            narrow_stack_conv(model, 0, options.width)
            return model
        index = strongest_filters(model.conv1, _keep(model.conv1.out_channels, options.width))
        model.conv1 = select_out(model.conv1, index)
        model.bn1 = select_bn(model.bn1, index)
        narrow_stage_input(model.layer1, index)
        return model


class SlimBeforeGap(Technique):
    name = "slim-before-gap"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"pre-gap-width"})
    Options = PreGapWidthOptions
    order = 6
    paper = "seed 003, Sec. II (optimisation before GAP), Table I no. 8"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if _is_resnet(model) and all(isinstance(b, (Bottleneck, BasicBlock))
                                     for b in model.layer4):
            return True, ""
        classifier = getattr(model, "classifier", None)
        if _plain_convs(model) and isinstance(classifier, nn.Sequential) \
                and any(isinstance(m, nn.Linear) for m in classifier):
            return True, ""
        return False, "needs a ResNet or a plain features stack followed by a linear classifier"

    def search_space(self, trial) -> PreGapWidthOptions:
        return PreGapWidthOptions(width=trial.suggest_categorical("width", [0.25, 0.5]))

    def apply(self, model: nn.Module, options: WidthOptions, ctx) -> nn.Module:
        if not _is_resnet(model):
            narrow_stack_conv(model, -1, options.width)
            return model
        channels = model.fc.in_features
        index = narrow_stage_output(model.layer4, _keep(channels, options.width))
        model.fc = select_linear_in(model.fc, index, channels)
        return model


@dataclasses.dataclass(frozen=True)
class NarrowOptions:
    divisor: float = 24.0
    links: str = ""  # e.g. "10/22/42/86": one width per stage, overrides divisor

    def __post_init__(self):
        check_range("narrow-bottleneck", "divisor", self.divisor, 1.0, 512.0)
        if self.links and not all(p.strip().isdigit() and int(p) > 0
                                  for p in self.links.split("/")):
            raise OptionError(f"option links={self.links!r} of technique 'narrow-bottleneck'"
                              " must be positive integers, one per stage, e.g. 10/22/42/86")


class NarrowBottleneck(Technique):
    name = "narrow-bottleneck"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"residual-links"})
    Options = NarrowOptions
    inherits_weights = False
    order = 1
    paper = "seed 003, Sec. III-A e) (inverted bottlenecks), Table I no. 6"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if _is_resnet(model) and isinstance(model.layer1[0], Bottleneck):
            return True, ""
        return False, "needs ResNet bottleneck blocks (ResNet-50/101)"

    def search_space(self, trial) -> NarrowOptions:
        return NarrowOptions(divisor=trial.suggest_categorical("divisor", [4.0, 8.0, 24.0]))

    def apply(self, model: nn.Module, options: NarrowOptions, ctx) -> nn.Module:
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        if options.links:
            widths = [int(p) for p in options.links.split("/")]
            if len(widths) != len(stages):
                raise OptionError(f"option links={options.links!r} of technique"
                                  f" 'narrow-bottleneck' needs {len(stages)} widths")
        else:
            widths = [_keep(_last_width(s), 1 / options.divisor) for s in stages]
        for number, (stage, width) in enumerate(zip(stages, widths)):
            index = narrow_stage_output(stage, width)
            if number + 1 < len(stages):
                narrow_stage_input(stages[number + 1], index)
            else:
                model.fc = select_linear_in(model.fc, index, model.fc.in_features)
        return model


def _last_width(stage: nn.Sequential) -> int:
    return getattr(stage[0], _last(stage[0])[0]).out_channels


@hookimpl
def register_techniques(register):
    register(SlimStem())
    register(SlimBeforeGap())
    register(NarrowBottleneck())
