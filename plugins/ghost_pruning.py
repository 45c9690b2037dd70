"""Torch-Pruning's view of a ghost module: one layer whose output channels come in ``ratio``
equal blocks (the intrinsic maps, then each set of cheap copies), pruned together.

Traced layer by layer, a ghost module's concatenation was pruned inconsistently wherever a
depthwise convolution, squeeze-excitation or a Fire block was near it (a ratio-4 stack kept one
channel of eight; ResNet-18's ghost bottlenecks kept one channel per layer). As one unit with
``ratio`` channel groups, Torch-Pruning removes the same intrinsic map's position from every
block, and this pruner removes that map from the primary convolution, its batch norm and every
cheap copy. Torch-Pruning does not look inside the unit to rank its channels, so a ghost
module's channels are ranked by its own layers (:func:`ghost_aware`).
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from autoshrink.models import is_depthwise
from autoshrink_plugins.blocks import GhostModule


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


class GhostPruner(tp.pruner.function.BasePruningFunc):
    TARGET_MODULES = GhostModule

    def prune_out_channels(self, layer: GhostModule, idxs) -> GhostModule:
        intrinsic = sorted({i % layer.primary[1].num_features for i in idxs})
        tp.prune_conv_out_channels(_convs(layer.primary)[-1], intrinsic)
        tp.prune_batchnorm_out_channels(layer.primary[1], intrinsic)
        for cheap in layer.cheap:
            tp.prune_depthwise_conv_out_channels(cheap[0], intrinsic)
            tp.prune_batchnorm_out_channels(cheap[1], intrinsic)
        return layer

    def prune_in_channels(self, layer: GhostModule, idxs) -> GhostModule:
        """The primary convolution's inputs; where dwconv split it, the depthwise half loses
        those channels altogether and the pointwise half its inputs."""
        for conv in _convs(layer.primary):
            if not is_depthwise(conv):
                tp.prune_conv_in_channels(conv, list(idxs))
                break
            tp.prune_depthwise_conv_out_channels(conv, list(idxs))
        return layer

    def get_out_channels(self, layer: GhostModule) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: GhostModule) -> int:
        return _convs(layer.primary)[0].in_channels

    def get_out_channel_groups(self, layer: GhostModule) -> int:
        return len(layer.cheap) + 1


PRUNER = GhostPruner()


def _scores(layer: GhostModule, criterion: str) -> torch.Tensor:
    """One score per output channel from the layer that makes it: the primary convolution's
    filter (or batch-norm scale) for an intrinsic map, the cheap convolution's for a copy."""
    if criterion == "bn-scale":
        per_block = [layer.primary[1].weight, *(cheap[1].weight for cheap in layer.cheap)]
        return torch.cat([w.detach().abs() for w in per_block])
    weights = [_convs(layer.primary)[-1].weight, *(cheap[0].weight for cheap in layer.cheap)]
    if criterion == "taylor":  # prune-filters has run the backward pass
        return torch.cat([(w * w.grad).detach().abs().flatten(1).sum(1) for w in weights])
    norm = 2 if criterion == "l2" else 1
    return torch.cat([w.detach().flatten(1).norm(p=norm, dim=1) for w in weights])


def ghost_aware(importance, criterion: str):
    """``importance``, but a group rooted at a ghost module's outputs is ranked by the module's
    own layers, divided by their mean like Torch-Pruning's scores so a global ranking can
    compare them (Torch-Pruning's own score for such a group came only from the layers that read
    it, and was empty where those were ghost modules too, so the group was never pruned)."""

    def ranked(group):
        dep = group[0].dep
        if isinstance(dep.target.module, GhostModule) and dep.handler == PRUNER.prune_out_channels:
            scores = _scores(dep.target.module, criterion)
            return scores / scores.mean().clamp_min(1e-12)
        return importance(group)

    return ranked
