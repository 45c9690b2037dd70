"""A quantizer that takes a trained model below the budget is applied again, one step finer.

Quantization comes last in a trial and undoes it more often than anything else: of 617
completed trials in 16 stored default and hypervolume studies, 121 ended over budget, and in 63
of them the model was still within budget one epoch before the end; all 63 carried a
post-training quantizer (k-means at 2 bits lost a median 66 pp, at 3 bits 22 pp, fixed point at
4 bits 6 pp; docs/performance.md). In a later default search (seed 3), a trial had trained a
model with 62.5x fewer parameters to 97.2 % (the budget's floor: 92.9 %), which 2-bit k-means
then took to 30.2 %: the search's best within budget stayed at 48.8x.

So a quantizer's sampled setting is where a trial starts: when the quantized model misses the
budget that the model before quantization met, the quantization stage runs again on a copy of
that model with the options its technique's ``finer`` gives (one more bit), until the model meets
the budget or no finer setting is left. The trial's plan records the options it ended with, so
its description, export and rebuild match the model; options fixed with ``--set`` are kept as
given. (Intel Neural Compressor's accuracy-aware tuning rests on the same idea: it moves layers
back to higher precision until an accuracy criterion holds.) A model that cannot be deep-copied
is quantized once, as sampled.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from autoshrink.plan import Plan, Step, apply_stage
from autoshrink.technique import Stage, TrialContext, copy_or_none, options_to_dict


@dataclasses.dataclass(frozen=True)
class Quantized:
    model: nn.Module
    plan: Plan  # with the options the quantization stage ended with
    accuracy: float  # validation accuracy of ``model``


def finer_plan(plan: Plan, fixed: Mapping[str, Mapping[str, Any]]) -> Plan | None:
    """``plan`` with each quantization step one setting finer, where its technique has a finer
    setting that leaves the options fixed for it as they are; None when no step has one."""
    raised = {}
    for step in plan.at(Stage.QUANTIZATION):
        finer = step.technique.finer(step.options)
        if finer is not None and not _changes_fixed(step, finer, fixed.get(step.name, {})):
            raised[step.name] = finer
    return plan.with_options(raised) if raised else None


def _changes_fixed(step: Step, finer: Any, fixed: Mapping[str, Any]) -> bool:
    before, after = options_to_dict(step.options), options_to_dict(finer)
    return any(before[key] != after[key] for key in fixed)


def quantize_within_budget(plan: Plan, model: nn.Module, ctx: TrialContext,
                           fixed: Mapping[str, Mapping[str, Any]]) -> Quantized:
    """Run ``plan``'s quantization stage on the trained ``model`` (in eval mode), finer while
    its validation accuracy (``ctx.accuracy``) is below ``ctx.target_accuracy``, the budget's
    floor, and the model before it was not. ``ctx`` is a search's: with data and a target."""
    floor, finer = ctx.target_accuracy, finer_plan(plan, fixed)
    before = copy_or_none(model) if finer is not None else None
    quantized = apply_stage(plan, Stage.QUANTIZATION, model, ctx)
    measured = ctx.accuracy(quantized)
    # as sampled when nothing can be raised, or nothing raised from, or nothing needs it
    if before is None or measured >= floor or ctx.accuracy(before) < floor:
        return Quantized(quantized, plan, measured)
    while measured < floor and finer is not None:
        plan, finer = finer, finer_plan(finer, fixed)
        quantized = apply_stage(plan, Stage.QUANTIZATION, copy.deepcopy(before), ctx)
        measured = ctx.accuracy(quantized)
    return Quantized(quantized, plan, measured)
