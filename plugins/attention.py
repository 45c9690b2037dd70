"""Squeeze-and-excitation attention, seed 003 (Sec. III-A h), Table I no. 12/14, Table II
no. 11-13).

SE blocks (GAP, two linear layers with ReLU, sigmoid) are attached after every block: after each
convolution unit or Fire module of a plain stack (after its activation), inside each ResNet block
on the residual branch before the addition, and between the two ghost modules of a ghost
bottleneck (the paper's placement). They add parameters and few MACs; each starts near the
identity, so the trained weights are kept and a trial fine-tunes.
"""

from __future__ import annotations

import dataclasses

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_range
from autoshrink_plugins.blocks import Fire, GhostBottleneck, GhostModule, SqueezeExcite


@dataclasses.dataclass(frozen=True)
class SeOptions:
    reduction: int = 4

    def __post_init__(self):
        check_range("se", "reduction", self.reduction, 1, 256)


def _width(module: nn.Module) -> int | None:
    if isinstance(module, (Fire, GhostModule, nn.Conv2d)):
        return module.out_channels
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Conv2d):
        return module[-1].out_channels  # a depthwise-separable or factorised pair
    return None


class SqueezeExcitation(Technique):
    name = "se"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"attention"})
    Options = SeOptions
    order = 60
    paper = "seed 003, Table I no. 12 and 14, Table II no. 11-13"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if any(isinstance(m, (Bottleneck, BasicBlock)) for m in model.modules()):
            return True, ""
        features = getattr(model, "features", None)
        if isinstance(features, nn.Sequential) and _unit_ends(list(features)):
            return True, ""
        return False, ("needs ResNet blocks or a VGG-style features stack of convolution (or"
                       " Fire) units")

    def search_space(self, trial) -> SeOptions:
        return SeOptions(reduction=trial.suggest_categorical("reduction", [4, 8, 16]))

    def apply(self, model: nn.Module, options: SeOptions, ctx) -> nn.Module:
        r = options.reduction
        for block in model.modules():
            if isinstance(block, Bottleneck):
                block.bn3 = nn.Sequential(block.bn3, SqueezeExcite(block.bn3.num_features, r))
            elif isinstance(block, BasicBlock):
                block.bn2 = nn.Sequential(block.bn2, SqueezeExcite(block.bn2.num_features, r))
            elif isinstance(block, GhostBottleneck):
                block.attention = SqueezeExcite(block.project.primary[0].in_channels, r)
        features = getattr(model, "features", None)
        if isinstance(features, nn.Sequential):
            model.features = nn.Sequential(*self._after_units(list(features), r))
        return model

    @staticmethod
    def _after_units(layers: list[nn.Module], reduction: int) -> list[nn.Module]:
        """Insert SE after the activation that closes each conv / Fire unit (not the stem)."""
        gates = dict(_unit_ends(layers))
        result = []
        for index, layer in enumerate(layers):
            result.append(layer)
            if index in gates:
                result.append(SqueezeExcite(gates[index], reduction))
        return result


def _unit_ends(layers: list[nn.Module]) -> list[tuple[int, int]]:
    """(index, width) of the layer that closes each conv / Fire unit after the stem: its
    activation, or the unit itself when no batch norm or ReLU follows it."""
    ends, width = [], None
    for index, layer in enumerate(layers):
        found = _width(layer)
        if found is not None:
            width = found if index > 0 else None
        closes = isinstance(layer, nn.ReLU) or (
            found is not None and not isinstance(
                layers[index + 1] if index + 1 < len(layers) else None,
                (nn.BatchNorm2d, nn.ReLU)))
        if closes and width is not None:
            ends.append((index, width))
            width = None
    return ends


@hookimpl
def register_techniques(register):
    register(SqueezeExcitation())
