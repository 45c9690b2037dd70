"""Iterative unstructured L1 pruning with fine-tuning, seed 003 (Sec. III-C, Table III).

Each step zeroes the ``amount`` fraction of the still-unpruned weights with the smallest absolute
value (globally across all conv and linear weights, or per layer), then fine-tunes with SGD at a
constant learning rate and early stopping on the validation split. The paper uses amount 0.2,
LR 1e-4 and up to 50 epochs per step; to keep a trial to seconds we cap each step's fine-tuning
at ``finetune_epochs`` (searchable is the amount and the number of steps). The zeros are made
permanent at the end; the artifact stores the weights sparsely, so its size falls with sparsity.

In a search the sampled ``steps`` is the most it takes. The paper prunes on and reads off the
accuracy at each sparsity (its Table III), the deepest level within the budget being the one to
keep; so after each step's fine-tuning the model is measured on the validation split, and the
first step that leaves it below the budget's floor ends the pruning: that step is taken back
(the model returns to the one before it; a first step is kept) and the trial records the steps
it kept (``TrialContext.settle_options``). Further steps would only lose more accuracy, and a
trial that ran them ended over budget with nothing to show. Outside a search every step runs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import prune

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_choice, check_range, copy_or_none
from autoshrink_plugins.rewrite import weight_layers


@dataclasses.dataclass(frozen=True)
class PruneL1Options:
    amount: float = 0.2
    steps: int = 3
    scope: str = "global"
    finetune_epochs: int = 2
    lr: float = 1e-3

    def __post_init__(self):
        check_range("prune-l1", "amount", self.amount, 0.01, 0.95)
        check_range("prune-l1", "steps", self.steps, 1, 20)
        check_choice("prune-l1", "scope", self.scope, ("global", "layer"))
        check_range("prune-l1", "finetune_epochs", self.finetune_epochs, 0, 50)
        check_range("prune-l1", "lr", self.lr, 1e-6, 1.0)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in weight_layers(model) if isinstance(m.weight, nn.Parameter)]


def mask_smallest(targets: list[tuple[nn.Module, str]], share: float) -> None:
    """Mask the ``share`` of the weights in ``targets`` with the smallest magnitudes, under one
    threshold for them all.

    The masks of torch's ``L1Unstructured`` but for ties at the threshold (exact zeros, in
    practice, which are pruned either way), found with one ``kthvalue`` instead of a ``topk``
    over every weight: three steps on VGG-11 (28 M weights) took 9.9 s that way, 3.1 s this way.
    """
    magnitudes = [getattr(module, name).detach().abs() for module, name in targets]
    every = torch.cat([m.flatten() for m in magnitudes])
    count = round(share * every.numel())
    threshold = float(every.kthvalue(count).values) if count else -1.0
    for (module, name), magnitude in zip(targets, magnitudes):
        prune.custom_from_mask(module, name, (magnitude > threshold).to(magnitude.dtype))


class PruneL1(Technique):
    name = "prune-l1"
    stage = Stage.POST_TRAINING
    claims = frozenset({"weight-sparsity"})
    Options = PruneL1Options
    paper = "seed 003, Sec. III-C and Table III"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        return (True, "") if prunable(model) else (False, "has no conv or linear weights")

    def search_space(self, trial) -> PruneL1Options:
        return PruneL1Options(amount=trial.suggest_float("amount", 0.1, 0.5, step=0.05),
                              steps=trial.suggest_int("steps", 1, 6))

    def apply(self, model: nn.Module, options: PruneL1Options, ctx) -> nn.Module:
        weights = [m.weight for m, _ in prunable(model)]
        alive = sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)
        # the budget's floor; outside a search (no data, no budget) every step runs
        floor = ctx.target_accuracy if ctx.accuracy_fn is not None else None
        for step in range(1, options.steps + 1):
            before = copy_or_none(model) if floor is not None and step > 1 else None
            # Zeros (from earlier steps or an earlier technique) are the smallest magnitudes, so
            # pruning this share of all weights removes ``amount`` of the ones still alive.
            share = 1.0 - alive * (1.0 - options.amount) ** step
            model.to(memory_format=torch.contiguous_format)  # pruning flattens the weights
            targets = prunable(model)
            groups = [targets] if options.scope == "global" else [[t] for t in targets]
            for group in groups:
                mask_smallest(group, share)
            # the masks keep pruned weights at zero while fine-tuning
            model = ctx.finetune(model, max_epochs=options.finetune_epochs, lr=options.lr,
                                 patience=0, constant_lr=True,
                                 label=f"fine-tuning after step {step} of {options.steps}")
            # the fine-tune measured the model it kept (None if it did not); taking the masks
            # off changes none of its outputs
            accuracy = ctx.finetuned_accuracy
            for module, name in targets:
                prune.remove(module, name)
            if floor is not None and (ctx.accuracy(model) if accuracy is None
                                      else accuracy) < floor:
                # a further step would only lose more; the one before met the budget
                kept = step - 1 if before is not None else step
                if kept < options.steps:
                    ctx.settle_options(self.name, dataclasses.replace(options, steps=kept))
                return before if before is not None else model
        return model


@hookimpl
def register_techniques(register):
    register(PruneL1())
