"""Removing whole layers in proportion to the input's redundancy, seed 001 stage 3.

Seed 001 probes how much of the input can be dropped without hurting accuracy (``autoshrink
probe``) and then removes about that share of the network's weights by deleting layers: its
"lightweight" VGG16 loses two 512-channel 3x3 convolutions, 29.4 % of the parameters for an
estimated redundancy of 1/4, and is trained by distillation from the original (``distill``).

``drop-layers`` removes the layers a network can lose without any other change: convolutions
that keep the shape of their input (same channels, stride 1, 'same' padding) together with the
batch norm and activation after them, and residual blocks whose shortcut is the identity. It
takes the largest first until the removed parameters reach ``redundancy`` of the total, or no
removable layer is left (a network may not have enough). The remaining layers keep the
baseline's weights and the trial fine-tunes them, with distillation when the plan has it; the
paper trains its student anew (setting ``inherits_weights`` per trial is not supported).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_choice

FRACTIONS = (0.25, 0.5, 0.75)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardswish)


@dataclasses.dataclass(frozen=True)
class DropLayersOptions:
    redundancy: float = 0.25

    def __post_init__(self):
        check_choice("drop-layers", "redundancy", self.redundancy, FRACTIONS)


@dataclasses.dataclass(frozen=True)
class Removable:
    """Entries ``start`` to ``stop`` (exclusive) of the Sequential ``container``."""

    container: nn.Sequential
    start: int
    stop: int
    params: int


def _keeps_shape(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.in_channels == conv.out_channels
            and conv.stride == (1, 1) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding == tuple(k // 2 for k in conv.kernel_size)
            and all(k % 2 == 1 for k in conv.kernel_size))


def _is_identity_residual(block: nn.Module) -> bool:
    """A residual block (torchvision style) whose shortcut adds the input unchanged."""
    return hasattr(block, "downsample") and block.downsample is None and any(
        isinstance(m, nn.Conv2d) for m in block.modules())


def removable_layers(model: nn.Module) -> list[Removable]:
    """Every layer group that can go without changing any other layer's shape."""
    found = []
    for container in model.modules():
        if not isinstance(container, nn.Sequential):
            continue
        layers = list(container)
        for i, layer in enumerate(layers):
            stop = None
            if _keeps_shape(layer):
                stop = i + 1
                if stop < len(layers) and isinstance(layers[stop], nn.BatchNorm2d):
                    stop += 1
                if stop < len(layers) and isinstance(layers[stop], ACTIVATIONS):
                    stop += 1
            elif _is_identity_residual(layer):
                stop = i + 1
            if stop is not None:
                params = sum(p.numel() for m in layers[i:stop] for p in m.parameters())
                found.append(Removable(container, i, stop, params))
    return found


def choose(model: nn.Module, redundancy: float) -> list[Removable]:
    """Largest first until ``redundancy`` of the parameters is covered (or none are left)."""
    total = sum(p.numel() for p in model.parameters())
    chosen, removed = [], 0
    for layer in sorted(removable_layers(model), key=lambda r: -r.params):
        if removed >= redundancy * total:
            break
        chosen.append(layer)
        removed += layer.params
    return chosen


class DropLayers(Technique):
    name = "drop-layers"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"depth"})
    Options = DropLayersOptions
    order = 5  # on the original layers, before any layer rewrite
    paper = "seed 001 stage 3 (Gabbasov et al.): the 'lightweight' VGG16"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if removable_layers(model):
            return True, ""
        return False, ("has no layer that keeps its input's shape (same-channel convolution or"
                       " identity residual block)")

    def search_space(self, trial) -> DropLayersOptions:
        return DropLayersOptions(
            redundancy=trial.suggest_categorical("redundancy", list(FRACTIONS)))

    def apply(self, model: nn.Module, options: DropLayersOptions, ctx) -> nn.Module:
        for layer in choose(model, options.redundancy):
            for index in range(layer.start, layer.stop):
                layer.container[index] = nn.Identity()
        return model


@hookimpl
def register_techniques(register):
    register(DropLayers())
