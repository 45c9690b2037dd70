"""Torch-Pruning across channel shuffles, grouped convolutions (ShuffleNet units) and
concatenations read through a flatten.

Torch-Pruning follows a channel from the layer that makes it to every layer that reads it and
assumes the channel keeps its index on the way. A channel shuffle moves it, so here a shuffle is
one layer to Torch-Pruning whose readers see its channels permuted (an index mapping on the
graph's edges). A grouped convolution (and the shuffle itself) can only lose the same positions
in each of its groups, counted in its own channel order; Torch-Pruning enforces that in the
order of the group's first layer only, which a shuffle breaks. So every pruning group is cut in
whole *atoms*: the smallest sets of the group's channels that every grouped layer in it can lose
together. Between two grouped 1x1 convolutions of g groups with a shuffle between them, an atom
is g*g channels: g evenly spaced positions in each of the first layer's groups, so that after
the shuffle they fall evenly into the second layer's groups. A group whose grouped layer also
reads channels of other groups (a shuffle after a concatenation) is one atom and keeps its
channels.

Torch-Pruning 1.6 also drops the offsets of a channel concatenation whose readers take a
flattened map of more than one pixel (a Fire block before seed 000's classifier at 32x32): it
compares the concatenation's width with the classifier's inputs, finds them unequal and then
prunes the same indices in both halves and the wrong columns of the classifier.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from autoshrink.models import is_depthwise
from autoshrink_plugins.blocks import ChannelShuffle


class ShufflePruner(tp.pruner.function.BasePruningFunc):
    """A channel shuffle as one layer: no weights, ``groups`` channel groups on either side."""

    TARGET_MODULES = ChannelShuffle

    def __init__(self, channels: dict[ChannelShuffle, int]):
        super().__init__()
        self.channels = channels

    def prune_out_channels(self, layer: ChannelShuffle, idxs) -> ChannelShuffle:
        return layer  # the shuffle reads its channel count from its input

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ChannelShuffle) -> int | None:
        return self.channels.get(layer)  # None for a shuffle the example did not reach

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer: ChannelShuffle) -> int:
        return layer.groups

    get_in_channel_groups = get_out_channel_groups


def shuffle_channels(model: nn.Module, example: torch.Tensor) -> dict[ChannelShuffle, int]:
    """How many channels each channel shuffle of ``model`` permutes, from one forward pass."""
    channels: dict[ChannelShuffle, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        channels[module] = args[0].shape[1]

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, ChannelShuffle)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return channels


def _permuted(order: torch.Tensor):
    """Index mapping sending channel i to ``order[i]``; Torch-Pruning's indices are named
    tuples that also carry the root layer's index, which stays."""
    table = order.tolist()

    def mapping(idxs):
        return [i._replace(idx=table[i.idx]) for i in idxs]

    return mapping


def _set_mapping(source, target, slot: int, mapping) -> None:
    """Put ``mapping`` in index-mapping ``slot`` of every edge of the graph from node
    ``source`` to node ``target`` (Torch-Pruning applies slot 0, then slot 1, which it gives
    concatenations)."""
    for dep in source.dependencies:
        if dep.target is target:
            dep.index_mapping[slot] = mapping


def _start(concatenation, position: int) -> int:
    """Where input ``position`` of a concatenation begins in its output, at the widths it has
    when asked (pruning narrows them group by group); 0 where Torch-Pruning knows no widths."""
    return sum((concatenation.concat_sizes or [])[:position])


def _permuted_in_concatenation(order: torch.Tensor, concatenation, position: int):
    """``_permuted`` for the edge from a concatenation back to the shuffle that is its input
    ``position`` (DenseNet's layers concatenate their outputs). Torch-Pruning maps such an edge
    here before it maps the concatenation's indices to the shuffle's span, so the permutation
    works in the concatenation's order: on the shuffle's span, shifted by its offset, leaving
    the other indices for that second mapping to drop."""
    table = order.tolist()

    def mapping(idxs):
        start = _start(concatenation, position)
        return [i._replace(idx=start + table[i.idx - start])
                if start <= i.idx < start + len(table) else i for i in idxs]

    return mapping


def follow_shuffles(graph, channels: dict[ChannelShuffle, int]) -> None:
    """Map indices across every shuffle in ``graph``: a shuffle's own indices are its input
    order, and the edges to and from its readers translate to and from its output order."""
    for shuffle, count in channels.items():
        node = graph.module2node.get(shuffle)
        if node is None:
            continue
        source_of = shuffle.permutation(count)  # output j holds input source_of[j]
        position_of = torch.argsort(source_of)
        for reader in node.outputs:
            _set_mapping(node, reader, 0, _permuted(position_of))
            back = _permuted(source_of)
            if reader.type == tp.ops.OPTYPE.CONCAT and reader.inputs.count(node) == 1:
                back = _permuted_in_concatenation(source_of, reader.module,
                                                  reader.inputs.index(node))
            _set_mapping(reader, node, 0, back)


def _offset(concatenation, position: int, into_concatenation: bool):
    """Index mapping between input ``position`` of a concatenation and its output."""

    def mapping(idxs):
        start = _start(concatenation, position)
        if into_concatenation:
            return [i._replace(idx=i.idx + start) for i in idxs]
        stop = start + concatenation.concat_sizes[position]
        return [i._replace(idx=i.idx - start) for i in idxs if start <= i.idx < stop]

    return mapping


def follow_concatenations(graph) -> None:
    """Map the inputs of every channel concatenation that Torch-Pruning left unmapped to their
    place in its output (it measured their widths already); a tensor concatenated with itself
    stays as it is."""
    for node in graph.module2node.values():
        sizes = getattr(node.module, "concat_sizes", None)
        if (node.type != tp.ops.OPTYPE.CONCAT or node.module.offsets is not None
                or getattr(node.grad_fn, "_saved_dim", None) != 1 or not sizes
                or None in sizes or len(set(node.inputs)) < len(node.inputs)
                or not node.enable_index_mapping):
            continue
        for position, source in enumerate(node.inputs):
            _set_mapping(node, source, 1, _offset(node.module, position, False))
            _set_mapping(source, node, 1, _offset(node.module, position, True))


class _Sets:
    """Union-find over a group's channel indices."""

    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, members: list[int]) -> None:
        for other in members[1:]:
            self.parent[self.find(other)] = self.find(members[0])


def atoms(graph, group) -> list[list[int]]:
    """The group's channels (in its root layer's order) in the smallest sets that can be pruned
    without leaving a grouped layer with unequal groups."""
    size = len(group[0].idxs)
    sets = _Sets(size)
    for item in group.items:
        layer, handler = item.dep.target.module, item.dep.handler
        pruner = graph.get_pruner_of_module(layer)
        if pruner is None or not isinstance(layer, nn.Module):
            continue
        if isinstance(layer, nn.Conv2d) and is_depthwise(layer):
            continue  # one channel per group: any channel may go
        outputs = graph.is_out_channel_pruning_fn(handler)
        groups = (pruner.get_out_channel_groups if outputs else pruner.get_in_channel_groups)(layer)
        if groups <= 1:
            continue
        channels = (pruner.get_out_channels if outputs else pruner.get_in_channels)(layer)
        if channels is None or len(set(item.idxs)) < channels:  # reads other groups' channels
            sets.join(list(range(size)))
            break
        by_position: dict[int, list[int]] = {}
        for index, root in zip(item.idxs, item.root_idxs):
            by_position.setdefault(index % (channels // groups), []).append(root)
        for members in by_position.values():
            sets.join(members)
    found: dict[int, list[int]] = {}
    for i in range(size):
        found.setdefault(sets.find(i), []).append(i)
    return list(found.values())


def _group_key(group) -> tuple:
    return group[0].dep.target.module, group[0].dep.handler


def _allowed(removed: set[int], parts: list[list[int]], layers: list[set[int]]) -> bool:
    """Whether ``removed`` (root indices) is whole atoms and leaves every layer a channel."""
    return (all(removed.issuperset(p) or removed.isdisjoint(p) for p in parts)
            and not any(layer <= removed for layer in layers))


def prune_in_atoms(pruner) -> None:
    """One step of a Torch-Pruning ``MetaPruner``, each group cut in whole atoms.

    Torch-Pruning decides how many channels each group loses; where its choice splits an atom
    or takes every channel of some layer (every map of a Fire block's 3x3 expand, say), the
    atoms with the lowest mean importance go instead, as many as fit in that number. A group
    that is one atom is not ranked at all, which also keeps Torch-Pruning's magnitude scores
    away from the inputs of a grouped convolution with one input per group (they come out one
    score short and fail).
    """
    graph, rank = pruner.DG, pruner.importance
    # per group, from the whole group Torch-Pruning ranks before it yields the part to cut: its
    # atoms, and the channels each of its layers has (none may lose them all), and its scores
    shapes, scores = {}, {}

    def importance(group):
        key = _group_key(group)
        shapes[key] = (atoms(graph, group), [set(i.root_idxs) for i in group.items])
        if len(shapes[key][0]) == 1:
            return None
        scores[key] = rank(group)
        return scores[key]

    pruner.importance = importance
    for group in pruner.step(interactive=True):  # ranks every group before the first is cut
        key, chosen = _group_key(group), set(group[0].idxs)
        parts, layers = shapes[key]
        if _allowed(chosen, parts, layers):
            group.prune()
            continue
        removed: set[int] = set()
        for part in sorted(parts, key=lambda p: float(scores[key][p].mean())):
            if len(removed) + len(part) <= len(chosen) and _allowed(removed | set(part), parts,
                                                                    layers):
                removed |= set(part)
        if removed:
            group.prune(idxs=sorted(removed))
