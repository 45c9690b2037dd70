"""Structured filter pruning with Torch-Pruning (DepGraph), for seeds 003 / 002's comparisons.

``prune-filters`` removes whole output channels: Torch-Pruning's dependency graph finds every
layer coupled to a pruned channel (batch norms, the next layer's inputs, residual additions,
concatenations, depthwise groups) and shrinks them together, so the result is an ordinary,
smaller dense model that loads without masks. The importance criterion (L1 or L2 magnitude,
batch-norm scale, first-order Taylor), the channel ratio and global-versus-per-layer ranking are
search parameters; the classifier's output layer is never pruned. Fine-tuned afterwards for
the recipe's ``--finetune-epochs`` (15 by default), as long as a rewrite's fine-tune: two
Fashion-MNIST models with 40-60 % of their filters removed still gained 0.5-0.7 pp in the last
of 5 epochs (the old default) and lost 0.1-0.4 pp less after 15. The batch-norm scale
criterion falls back to L1 magnitude where a layer has no batch norm. A ghost module is one unit
to Torch-Pruning, pruned by ``ghost_pruning``; channel shuffles, grouped convolutions and
concatenations read through a flatten are followed by ``channel_atoms``.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from autoshrink import Stage, Technique, hookimpl
from autoshrink.models import is_depthwise
from autoshrink.technique import RECIPE_EPOCHS, check_choice, check_range

CRITERIA = ("l1", "l2", "bn-scale", "taylor")


@dataclasses.dataclass(frozen=True)
class PruneFiltersOptions:
    ratio: float = 0.5
    criterion: str = "l1"
    global_ranking: bool = False
    finetune_epochs: int = RECIPE_EPOCHS

    def __post_init__(self):
        check_range("prune-filters", "ratio", self.ratio, 0.05, 0.95)
        check_choice("prune-filters", "criterion", self.criterion, CRITERIA)
        check_range("prune-filters", "finetune_epochs", self.finetune_epochs, RECIPE_EPOCHS,
                    100)


def _importance(criterion: str):
    """The criterion's Torch-Pruning scorer, ranking ghost modules by their own layers."""
    import torch_pruning as tp

    from autoshrink_plugins.ghost_pruning import ghost_aware

    scorer = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
              "l2": lambda: tp.importance.MagnitudeImportance(p=2),
              "bn-scale": _bn_scale_or_l1,
              "taylor": tp.importance.TaylorImportance}[criterion]()
    return ghost_aware(scorer, criterion)


def _bn_scale_or_l1():
    """Network Slimming's batch-norm scale for a channel group with a batch norm, L1 magnitude
    for one without: Torch-Pruning's bn-scale alone ranks no channel of a group without a batch
    norm, so on a plain stack (seed 000's CNN) it pruned nothing at all. Both are normalised by
    their group mean, so a global ranking can compare them."""
    import torch_pruning as tp

    bn_scale, l1 = tp.importance.BNScaleImportance(), tp.importance.MagnitudeImportance(p=1)

    def importance(group):
        scores = bn_scale(group)
        return scores if scores is not None else l1(group)

    return importance


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The layers whose outputs are the logits: never pruned."""
    from autoshrink_plugins.blocks import GhostModule

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, GhostModule))]
    with torch.no_grad():
        classes = model.eval()(example).shape[1]
    return [m for m in layers if getattr(m, "out_features", getattr(m, "out_channels", 0))
            == classes][-1:]


def untraceable_channels(model: nn.Module) -> str:
    """Why Torch-Pruning would mis-prune ``model`` ('' when it follows every channel).

    It follows channel shuffles and grouped convolutions (``channel_atoms``), but not DiCE's
    permutes of the width and height into the channels, nor a slice (a ghost module that cuts
    maps off), nor a shuffle or grouped convolution inside a ghost module, whose channels the
    ghost pruner maps one to one. Ghost modules inside Fire blocks were pruned inconsistently
    where the blocks are gated by squeeze-excitation or are residual (ResNet's): their
    concatenation with a plain convolution shares its channels with the gate or the shortcut,
    and a batch norm or the gate's linear layer came out mis-sized, so those are refused.
    Nor does it follow torchvision's ShuffleNetV2, whose shuffle reshapes the channels into
    two axes and back (building its graph divided by zero).
    """
    from torchvision.models.shufflenetv2 import InvertedResidual as ShuffleUnit

    from autoshrink_plugins.blocks import (
        ChannelShuffle,
        Fire,
        FireResidual,
        GhostModule,
        SqueezeExcite,
    )
    from autoshrink_plugins.dice import DiCE

    modules = list(model.modules())
    if any(isinstance(m, ShuffleUnit) for m in modules):
        return ("Torch-Pruning cannot follow channels through ShuffleNetV2's shuffle (a reshape"
                " of the channels into two axes)")
    if any(isinstance(m, DiCE) for m in modules):
        return "Torch-Pruning cannot follow channels through DiCE (width and height as channels)"
    ghosts = [m for m in modules if isinstance(m, GhostModule)]
    if any(m.surplus for m in ghosts):
        return ("Torch-Pruning cannot follow channels through a GhostModule that cuts maps off"
                " (a ghost ratio that does not divide the width)")
    if any(isinstance(m, ChannelShuffle) or (isinstance(m, nn.Conv2d) and m.groups > 1
                                             and not is_depthwise(m))
           for ghost in ghosts for m in ghost.primary.modules()):
        return ("prune-filters cannot prune a ghost module whose primary convolution is grouped"
                " (grouped-pointwise after ghost)")
    fires_with_ghosts = [m for m in modules if isinstance(m, (Fire, FireResidual))
                         and any(isinstance(g, GhostModule) for g in m.modules())]
    if fires_with_ghosts and (any(isinstance(m, SqueezeExcite) for m in modules)
                              or any(isinstance(m, FireResidual) for m in fires_with_ghosts)):
        return ("Torch-Pruning mis-prunes ghost modules inside Fire blocks that are residual or"
                " gated by squeeze-excitation")
    return ""


class PruneFilters(Technique):
    name = "prune-filters"
    stage = Stage.POST_TRAINING
    claims = frozenset({"channels"})
    Options = PruneFiltersOptions
    order = 10  # before unstructured pruning
    paper = "Torch-Pruning DepGraph; structured counterpart of seed 003's pruning"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        reason = untraceable_channels(model)
        if reason:
            return False, reason
        if sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 2:
            return True, ""
        return False, "has fewer than two convolutions"

    def search_space(self, trial) -> PruneFiltersOptions:
        return PruneFiltersOptions(
            ratio=trial.suggest_float("ratio", 0.2, 0.8, step=0.1),
            criterion=trial.suggest_categorical("criterion", list(CRITERIA)),
            global_ranking=trial.suggest_categorical("global_ranking", [False, True]))

    def apply(self, model: nn.Module, options: PruneFiltersOptions, ctx) -> nn.Module:
        import torch_pruning as tp

        from autoshrink_plugins.blocks import ChannelShuffle, GhostModule
        from autoshrink_plugins.channel_atoms import (
            ShufflePruner,
            follow_concatenations,
            follow_shuffles,
            prune_in_atoms,
            shuffle_channels,
        )
        from autoshrink_plugins.ghost_pruning import PRUNER

        model = model.cpu().to(memory_format=torch.contiguous_format)
        example = next(iter(ctx.calibration_batches(1)))[:8].float()
        channels = shuffle_channels(model, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                model, example, importance=_importance(options.criterion),
                pruning_ratio=options.ratio, global_pruning=options.global_ranking,
                ignored_layers=output_layers(model, example),
                customized_pruners={GhostModule: PRUNER,
                                    ChannelShuffle: ShufflePruner(channels)},
                root_module_types=[nn.Conv2d, nn.Linear, GhostModule])
            follow_shuffles(pruner.DG, channels)
            follow_concatenations(pruner.DG)
            if options.criterion == "taylor":
                model.train()
                model.zero_grad()
                logits = model(example)
                F.cross_entropy(logits, logits.argmax(1)).backward()
            prune_in_atoms(pruner)
        model.zero_grad(set_to_none=True)
        return ctx.finetune(model, max_epochs=options.finetune_epochs, patience=1)


@hookimpl
def register_techniques(register):
    register(PruneFilters())
