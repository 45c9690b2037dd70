"""Techniques that break in the ways a real plugin can; loaded with ``--plugin`` by the tests."""

from __future__ import annotations

import dataclasses

import torch

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import TrainerCallback


class Raising(Technique):
    name = "fault-raises"
    stage = Stage.POST_TRAINING

    def apply(self, model, options, ctx):
        raise ValueError("this plugin is broken")


class RaisingRewrite(Technique):
    """Fails while its plan is sampled: architecture rewrites are applied as they are chosen."""

    name = "fault-rewrite"
    stage = Stage.ARCHITECTURE

    def apply(self, model, options, ctx):
        raise IndexError("this rewrite is broken")


class RaisingSpace(Technique):
    """Fails as its options are sampled."""

    name = "fault-space"
    stage = Stage.POST_TRAINING

    def search_space(self, trial):
        raise KeyError("no such option table")

    def apply(self, model, options, ctx):
        return model


@dataclasses.dataclass(frozen=True)
class Amount:
    amount: float = 0.5


class UndeclaredOptions(Technique):
    """Returns options of a dataclass it does not declare as ``Options``: the trial ran, but its
    model file could not be loaded again (no test accuracy, no export)."""

    name = "fault-undeclared-options"
    stage = Stage.POST_TRAINING

    def search_space(self, trial):
        return Amount(trial.suggest_float("amount", 0.1, 0.9))

    def apply(self, model, options, ctx):
        return model


class ReturnsNothing(Technique):
    """Changes the model in place and forgets to return it."""

    name = "fault-returns-none"
    stage = Stage.POST_TRAINING

    def apply(self, model, options, ctx):
        model.eval()


class CastsToHalf(Technique):
    """Casts the weights to float16: the trial failed in evaluation with a dtype mismatch
    that named no technique."""

    name = "fault-casts-to-half"
    stage = Stage.POST_TRAINING

    def apply(self, model, options, ctx):
        return model.half()


class TooFewOutputs(Technique):
    """Swaps the last linear layer for one with five outputs: the trial failed in training
    with "Target 8 is out of bounds"."""

    name = "fault-too-few-outputs"
    stage = Stage.ARCHITECTURE

    def apply(self, model, options, ctx):
        name, last = [(n, m) for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear)][-1]
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, torch.nn.Linear(last.in_features, 5))
        return model


class FreezesEverything(Technique):
    """Freezes every weight before the trial trains: the trial failed with SGD's "optimizer
    got an empty parameter list"."""

    name = "fault-freezes-everything"
    stage = Stage.TRAINING

    def apply(self, model, options, ctx):
        return model.requires_grad_(False)


class PoisonedLoss(TrainerCallback):
    def loss(self, loss, logits, x, y):
        return loss * float("nan")


class WithLoss(Technique):
    """A training-stage technique that only changes the loss, through ``callback``."""

    stage = Stage.TRAINING
    callback: type[TrainerCallback]

    def apply(self, model, options, ctx):
        ctx.add_training_callback(self.callback())
        return model


class NanLoss(WithLoss):
    name = "fault-nan-loss"
    callback = PoisonedLoss


class OutOfMemory(Technique):
    """Asks the allocator for a petabyte: a real allocation failure, not a simulated one."""

    name = "fault-out-of-memory"
    stage = Stage.POST_TRAINING

    def apply(self, model, options, ctx):
        model.register_buffer("scratch", torch.empty(2 ** 48))
        return model


def _refuse_export(module, state_dict, prefix, local_metadata):
    raise OSError("disk quota exceeded")


class Unexportable(Technique):
    """A model whose state dict cannot be written."""

    name = "fault-export"
    stage = Stage.QUANTIZATION

    def apply(self, model, options, ctx):
        model._register_state_dict_hook(_refuse_export)
        return model


class ShuffledLabels(TrainerCallback):
    def loss(self, loss, logits, x, y):
        return torch.nn.functional.cross_entropy(logits, y[torch.randperm(len(y))])


class Unlearning(WithLoss):
    """Trains on shuffled labels: runs fine, but can never meet an accuracy budget."""

    name = "unlearning"
    callback = ShuffledLabels


FAULTS = (Raising(), RaisingRewrite(), RaisingSpace(), UndeclaredOptions(), ReturnsNothing(),
          CastsToHalf(), TooFewOutputs(), FreezesEverything(), NanLoss(), OutOfMemory(),
          Unexportable())


@hookimpl
def register_techniques(register):
    for technique in (*FAULTS, Unlearning()):
        register(technique)
