"""Grouped pointwise convolution with channel shuffle (ShuffleNet), seed 003 (Tables I-II).

Every 1x1 convolution becomes a grouped one (``groups`` a search parameter, 4 in the paper)
followed by a channel shuffle so information still crosses the groups; in a Fire module the
shuffle acts on the concatenated expand output, as the paper describes. A layer whose widths are
not divisible by ``groups`` is left as it is, and so are ResNet shortcut projections: grouping
them too gives 5.645 M parameters for Table I no. 5 where the paper reports 7.721 M; leaving
them dense matches it.
Weights are inherited: each grouped filter keeps the part of the original filter that reads its
group, arranged so that after the shuffle every output channel sits where it was.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_range
from autoshrink_plugins.blocks import ChannelShuffle, Fire, GhostModule
from autoshrink_plugins.rewrite import is_plain_conv, replace_modules


@dataclasses.dataclass(frozen=True)
class GroupedPointwiseOptions:
    groups: int = 4

    def __post_init__(self):
        check_range("grouped-pointwise", "groups", self.groups, 2, 64)


@torch.no_grad()
def grouped_from(conv: nn.Conv2d, groups: int, shuffle: bool) -> nn.Module:
    cin, cout = conv.in_channels, conv.out_channels
    grouped = nn.Conv2d(cin, cout, 1, conv.stride, groups=groups, bias=conv.bias is not None)
    shuffler = ChannelShuffle(groups)
    # grouped output channel order[j] is shuffled to position j and should compute channel j
    order = shuffler.permutation(cout) if shuffle else torch.arange(cout)
    per_in, per_out = cin // groups, cout // groups
    for position in range(cout):
        source = int(order[position])
        group = source // per_out
        grouped.weight[source] = conv.weight[position, group * per_in:(group + 1) * per_in]
        if conv.bias is not None:
            grouped.bias[source] = conv.bias[position]
    return nn.Sequential(grouped, shuffler) if shuffle else grouped


def _divisible(conv: nn.Module, groups: int, shuffled: bool = False) -> bool:
    """Whether ``conv`` is a 1x1 convolution that splits into ``groups`` groups; one to be
    followed by a shuffle needs at least two outputs per group. With one, its groups equal its
    outputs, which Torch-Pruning takes for a depthwise convolution, tying its inputs to its
    outputs, and its index mapping across the shuffle then failed: prune-filters raised an
    IndexError on MobileNetV3's squeeze-and-excitation (16 -> 8 channels, 8 groups). Fire's
    squeeze (no shuffle) and a ghost module's primary convolution (pruned as a whole module)
    are grouped as before."""
    return (is_plain_conv(conv, "pointwise") and conv.in_channels % groups == 0
            and conv.out_channels % groups == 0
            and (not shuffled or conv.out_channels >= 2 * groups))


def _shortcut_convolutions(model: nn.Module) -> set[int]:
    """The ids of the layers in ResNet blocks' downsampling shortcuts, which stay whole."""
    return {id(m) for b in model.modules() if isinstance(b, (Bottleneck, BasicBlock))
            and b.downsample is not None for m in b.downsample.modules()}


class GroupedPointwise(Technique):
    name = "grouped-pointwise"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"pointwise-convs"})
    Options = GroupedPointwiseOptions
    order = 50
    paper = "seed 003, Table I no. 5, Table II no. 8"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        shortcuts = _shortcut_convolutions(model)
        if any(_divisible(m, 2) and id(m) not in shortcuts for m in model.modules()):
            return True, ""
        return False, ("has no 1x1 convolution outside residual shortcuts (add fire or dwconv,"
                       " or use a ResNet with bottlenecks)")

    def search_space(self, trial) -> GroupedPointwiseOptions:
        return GroupedPointwiseOptions(groups=trial.suggest_categorical("groups", [2, 4, 8]))

    def apply(self, model: nn.Module, options: GroupedPointwiseOptions, ctx) -> nn.Module:
        g = options.groups
        for fire in [m for m in model.modules() if isinstance(m, Fire)]:
            for name in ("squeeze", "expand1x1"):
                if _divisible(getattr(fire, name), g):
                    setattr(fire, name, grouped_from(getattr(fire, name), g, shuffle=False))
            if fire.out_channels % g == 0:
                fire.shuffle = ChannelShuffle(g)
        for ghost in [m for m in model.modules() if isinstance(m, GhostModule)]:
            if _divisible(ghost.primary[0], g):  # the ghost pruner takes the module whole
                ghost.primary[0] = grouped_from(ghost.primary[0], g, shuffle=True)
        shortcuts = _shortcut_convolutions(model)
        replace_modules(model, lambda m: _divisible(m, g, shuffled=True)
                        and id(m) not in shortcuts,
                        lambda conv: grouped_from(conv, g, shuffle=True))
        return model


@hookimpl
def register_techniques(register):
    register(GroupedPointwise())
