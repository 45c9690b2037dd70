"""Pyramid training, seed 000 (Kivanc et al., Sec. 3.6-3.7, Tables 1-4).

The network is grown block by block instead of trained whole. Block 1 (the first
``block_convs`` convolutions with their pooling) is trained with a classifier of its own
(FC 128 + FC classes, Table 1). Its classifier is then dropped and the next block is joined on
(Table 3). Where the join should carry fewer maps than the trained block makes, the block's last
convolution is reduced by similarity: the two most similar of its feature maps (cosine, or
Euclidean distance) are merged into their mean, again and again, until ``reduction`` of its maps
are gone (Table 3's Conv3 reads 16 of Conv2's 32 maps: ``reduction=0.5``; 0 gives the
BaseNetwork). The joined network is trained, either the new block alone on the frozen earlier
ones (``separate``) or everything together (``combined``), and so on until the accuracy target
is met or the network's own classifier is reached. The trial's fine-tune then trains the whole
result together. Growing stops at the first block whose network meets the trial's budget, so a
dataset that needs less depth gets a shallower network (``stop_at_target``; a block's own head
reads its flattened maps, so a shallow network can have more parameters than the full one:
Table 1's FC1 reads 2048 values where the full network's FC3 reads 512).

Every layer starts from fresh weights (pyramid training trains from scratch); applies to plain
stacks (``features`` / ``pool`` / ``classifier`` of convolutions, batch norms, activations and
pooling) with at least two blocks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_choice, check_range
from autoshrink_plugins.feature_merge import choose_pairs, merge, similarity
from autoshrink_plugins.models import ConvNet
from autoshrink_plugins.rewrite import plain_units

HEAD_WIDTH = 128  # FC1 / FC3 of Tables 1-2


@dataclasses.dataclass(frozen=True)
class PyramidOptions:
    block_convs: int = 2
    reduction: float = 0.5
    metric: str = "cosine"
    variant: str = "separate"
    block_epochs: int = 5
    lr: float = 0.05
    stop_at_target: bool = True

    def __post_init__(self):
        check_range("pyramid", "block_convs", self.block_convs, 1, 8)
        check_range("pyramid", "reduction", self.reduction, 0.0, 0.9)
        check_choice("pyramid", "metric", self.metric, ("cosine", "euclidean"))
        check_choice("pyramid", "variant", self.variant, ("separate", "combined"))
        check_range("pyramid", "block_epochs", self.block_epochs, 0, 100)
        check_range("pyramid", "lr", self.lr, 1e-5, 1.0)


def block_ends(model: nn.Module, block_convs: int) -> list[int]:
    """End (exclusive) of each block in ``model.features``: a block runs up to the next
    block's first convolution; the last block takes the rest."""
    convs = plain_units(model) or []
    starts = convs[::block_convs]
    return [*starts[1:], len(model.features)]


def fresh_weights(module: nn.Module) -> None:
    for layer in module.modules():
        if hasattr(layer, "reset_parameters") and layer is not module:
            layer.reset_parameters()


def head_for(features: nn.Sequential, pool: nn.Module, num_classes: int,
             example: torch.Tensor) -> nn.Sequential:
    """A block's own classifier (FC 128 + FC classes) for the maps ``features`` makes."""
    was_training = features.training
    with torch.no_grad():
        width = torch.flatten(pool(features.eval()(example)), 1).shape[1]
    features.train(was_training)
    return nn.Sequential(nn.Linear(width, HEAD_WIDTH), nn.ReLU(inplace=True),
                         nn.Linear(HEAD_WIDTH, num_classes))


@torch.no_grad()
def reduce_by_similarity(model: nn.Module, at: int, keep: int, metric: str,
                         batch: torch.Tensor) -> None:
    """Merge the most similar maps of convolution ``at`` into their mean until ``keep`` are
    left (the maps as the next layer reads them: after batch norm, activation, pooling)."""
    end = next((i for i in (plain_units(model) or []) if i > at), len(model.features))
    while model.features[at].out_channels > keep:
        maps = model.features[:end](batch)
        channels = maps.shape[1]
        pairs = choose_pairs(similarity(maps, metric), float("-inf"),
                             min(channels - keep, channels // 2))
        merged = {i for pair in pairs for i in pair}
        groups = [list(p) for p in pairs] + [[c] for c in range(channels) if c not in merged]
        merge(model, at, groups, torch.ones(channels))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


class Pyramid(Technique):
    name = "pyramid"
    stage = Stage.TRAINING
    claims = frozenset({"depth", "schedule"})
    Options = PyramidOptions
    order = 10
    paper = "seed 000 (Kivanc et al.), Sec. 3.6-3.7: pyramid training with feature reduction"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if not plain_units(model) or not hasattr(model, "pool"):
            return False, ("needs a plain stack (features of conv / BN / ReLU / pooling, pool,"
                           " classifier)")
        if len(block_ends(model, PyramidOptions.block_convs)) < 2:
            return False, "has fewer than two blocks of convolutions"
        return True, ""

    def search_space(self, trial) -> PyramidOptions:
        return PyramidOptions(
            block_convs=trial.suggest_int("block_convs", 1, 3),
            reduction=trial.suggest_float("reduction", 0.0, 0.75, step=0.25),
            metric=trial.suggest_categorical("metric", ["cosine", "euclidean"]),
            variant=trial.suggest_categorical("variant", ["separate", "combined"]),
            stop_at_target=trial.suggest_categorical("stop_at_target", [True, False]))

    def apply(self, model: nn.Module, options: PyramidOptions, ctx) -> nn.Module:
        model = model.cpu().to(memory_format=torch.contiguous_format)
        fresh_weights(model)
        ends = block_ends(model, options.block_convs)
        batch = torch.cat(list(ctx.calibration_batches(4)))[:256].float()
        for index, end in enumerate(ends):
            if index > 0:
                self._join(model, ends[index - 1], options, batch)
                fresh_weights(model.features[ends[index - 1]:end])
            last = index == len(ends) - 1
            network = self._network(model, end, last, ctx)
            if index > 0 and options.variant == "separate":
                set_trainable(model.features[:ends[index - 1]], False)
            ctx.finetune(network, max_epochs=options.block_epochs, lr=options.lr,
                         patience=None, watched=False,
                         label=f"training of block {index + 1} of {len(ends)}")
            set_trainable(network, True)
            if last or (options.stop_at_target and self._meets_target(network, ctx)):
                return network
        raise AssertionError("unreachable: the last block always returns")

    def rebuild(self, model: nn.Module, options: PyramidOptions, ctx) -> nn.Module:
        """The saved model's depth (the block after which growing stopped, seen from which
        convolutions the file holds); reduced channel counts are restored when loading."""
        ends = block_ends(model, options.block_convs)
        saved = ctx.saved_state or {}
        for index, end in enumerate(ends):
            last = index == len(ends) - 1
            if last or (saved and f"features.{end}.weight" not in saved):
                return self._network(model, end, last, ctx)
        raise AssertionError("unreachable: the last block always returns")

    @staticmethod
    def _join(model: nn.Module, end: int, options: PyramidOptions, batch: torch.Tensor) -> None:
        """Reduce the last convolution before ``end`` to its share of maps for the next block."""
        at = max(i for i in plain_units(model) if i < end)
        channels = model.features[at].out_channels
        keep = max(1, round(channels * (1.0 - options.reduction)))
        was_training = model.training
        reduce_by_similarity(model.eval(), at, keep, options.metric, batch.to(_device(model)))
        model.train(was_training)

    @staticmethod
    def _network(model: nn.Module, end: int, last: bool, ctx) -> ConvNet:
        """Blocks up to ``end`` with the model's own classifier (last block) or a new head."""
        features = model.features[:end]
        if last:
            return ConvNet(features, model.pool, model.classifier)
        example = ctx.example_input().to(_device(model))
        head = head_for(features, model.pool, ctx.num_classes, example)
        return ConvNet(features, model.pool, head.to(example.device))

    @staticmethod
    def _meets_target(network: nn.Module, ctx) -> bool:
        accuracy = ctx.accuracy(network)
        return (accuracy is not None and ctx.target_accuracy is not None
                and accuracy >= ctx.target_accuracy)


@hookimpl
def register_techniques(register):
    register(Pyramid())
