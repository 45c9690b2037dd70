"""A trial's plan: which techniques run, with which options, in stage order.

Sampling is define-by-run: a technique is only offered when it applies to the model and none of
its claims is already taken, so impossible combinations are outside the search space instead of
becoming failed trials.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from autoshrink.errors import TrialFailed, UnknownNameError, UsageError
from autoshrink.progress import running_step
from autoshrink.technique import Stage, Technique, TrialContext, options_to_dict, parse_options


@dataclasses.dataclass(frozen=True)
class Step:
    technique: Technique
    options: Any

    @property
    def name(self) -> str:
        return self.technique.name

    def describe(self) -> str:
        """Name plus the options that differ from the technique's defaults."""
        defaults = options_to_dict(self.technique.Options())
        opts = {k: v for k, v in options_to_dict(self.options).items() if defaults.get(k) != v}
        if not opts:
            return self.name
        return f"{self.name}({', '.join(f'{k}={_fmt(v)}' for k, v in opts.items())})"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# the Optuna parameter under which a trial that trains records its share of the recipe's epochs
TRAINING_LENGTH_PARAM = "training.length"
# the end of a plan's text that gives its share of the epochs (`` @ 50% epochs``): written by
# Plan.describe, read back by starting plans (group 1: the percentage)
LENGTH_SUFFIX = re.compile(r"\s*@\s*([0-9.]+)\s*%\s*epochs\s*$")


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    # the share of the recipe's epochs the trial trains for (the search's fidelity): part of
    # what a reader of a log line, a report or a plugin hook needs to know about the plan
    training_length: float = 1.0

    def at(self, stage: Stage) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.technique.stage is stage)

    def describe(self) -> str:
        text = " + ".join(step.describe() for step in self.steps) or "baseline"
        if self.retrains and self.training_length != 1:
            text += f" @ {self.training_length:.0%} epochs"  # as LENGTH_SUFFIX reads it
        return text

    def with_options(self, options: Mapping[str, Any]) -> Plan:
        """This plan with the steps named in ``options`` given those options instead."""
        steps = tuple(Step(s.technique, options[s.name]) if s.name in options else s
                      for s in self.steps)
        return dataclasses.replace(self, steps=steps)

    def settled_as(self, earlier: Plan) -> Plan:
        """This plan with the options that ``earlier``, a run of the same sampled plan, ended
        its post-training and quantization steps with (a quantizer run finer, a pruner that
        kept fewer steps: ``TrialContext.settle_options``)."""
        return self.with_options({step.name: step.options
                                  for stage in (Stage.POST_TRAINING, Stage.QUANTIZATION)
                                  for step in earlier.at(stage)})

    def to_json(self) -> str:
        return json.dumps([[s.name, options_to_dict(s.options)] for s in self.steps])

    @classmethod
    def from_json(cls, text: str, techniques: dict[str, Technique]) -> Plan:
        steps = []
        for name, options in json.loads(text):
            if name not in techniques:
                raise TrialFailed(f"technique {name!r} of this trial is no longer installed")
            technique = techniques[name]
            steps.append(Step(technique, parse_options(technique, options)))
        return cls(tuple(steps))

    @property
    def retrains(self) -> bool:
        """Whether a trial must train: some step changes the architecture or the training."""
        return bool(self.at(Stage.ARCHITECTURE) or self.at(Stage.TRAINING))

    @property
    def trains_from_scratch(self) -> bool:
        return any(not s.technique.inherits_weights for s in self.at(Stage.ARCHITECTURE))


class ScopedTrial:
    """Prefixes parameter names with the technique's name so search spaces never collide.

    Options in ``fixed`` are not searched: they are recorded as one-choice parameters.
    """

    def __init__(self, trial, prefix: str, fixed: Mapping[str, Any] | None = None):
        self._trial, self._prefix, self._fixed = trial, prefix, fixed or {}

    def _fixed_or(self, name: str, suggest):
        if name in self._fixed:
            return self._trial.suggest_categorical(f"{self._prefix}.{name}", [self._fixed[name]])
        return suggest(f"{self._prefix}.{name}")

    def suggest_int(self, name: str, *args, **kwargs) -> int:
        return self._fixed_or(name, lambda full: self._trial.suggest_int(full, *args, **kwargs))

    def suggest_float(self, name: str, *args, **kwargs) -> float:
        return self._fixed_or(name, lambda full: self._trial.suggest_float(full, *args,
                                                                           **kwargs))

    def suggest_categorical(self, name: str, choices):
        return self._fixed_or(name, lambda full: self._trial.suggest_categorical(full, choices))


def why_not(technique: Technique, model: nn.Module) -> str:
    """'' when ``technique`` applies to ``model``, else the reason it does not."""
    try:
        ok, reason = technique.applies_to(model)
    except Exception as error:  # a broken plugin makes its technique unavailable
        ok, reason = False, f"applies_to raised {type(error).__name__}: {error}"
    return "" if ok else (reason or "does not apply")


def applicability(techniques: dict[str, Technique], model: nn.Module) -> dict[str, str]:
    """Technique name -> '' when it applies to ``model``, else the reason it does not."""
    return {name: why_not(technique, model) for name, technique in techniques.items()}


def run_order(technique: Technique) -> tuple:
    return technique.stage, technique.order, technique.name


def ordered(techniques: dict[str, Technique]) -> list[Technique]:
    return sorted(techniques.values(), key=run_order)


def fixed_option_values(techniques: dict[str, Technique],
                        fixed: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Typed, validated fixed options; unknown techniques or options are refused."""
    typed = {}
    for name, values in fixed.items():
        if name not in techniques:
            raise UnknownNameError("technique", name, list(techniques))
        options = options_to_dict(parse_options(techniques[name], values))
        typed[name] = {key: options[key] for key in values}
    return typed


class SamplingFailed(Exception):
    """A technique raised while its plan was being sampled (its option space, or its
    architecture rewrite, applied as chosen): ``plan`` holds the steps chosen so far, the
    failing one last, so the trial can be recorded with what it tried."""

    def __init__(self, plan: Plan, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.plan, self.error = plan, error


def sample_plan(trial, techniques: dict[str, Technique], model: nn.Module,
                ctx: TrialContext,
                fixed: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Plan, nn.Module]:
    """Sample a plan and apply its architecture rewrites to ``model`` as they are chosen.

    A technique is offered only if it applies to the model as rewritten so far, so one rewrite
    can enable another (``fire`` creates the 1x1 convolutions ``grouped-pointwise`` needs);
    one that changes nothing at the sampled options is left out. ``fixed`` holds options
    (typed, see :func:`fixed_option_values`) that are not searched.
    """
    fixed = fixed or {}
    steps, claimed = [], set()
    for technique in ordered(techniques):
        if technique.claims & claimed or why_not(technique, model):
            continue
        if not trial.suggest_categorical(f"use.{technique.name}", [False, True]):
            continue
        held = fixed.get(technique.name, {})
        try:
            options = technique.search_space(ScopedTrial(trial, technique.name, held))
        except Exception as error:
            raise _space_failed(steps, technique, f"raised {type(error).__name__}: {error}"
                                ) from error
        if not isinstance(options, technique.Options):  # it would not load again (parse_options)
            raise _space_failed(steps, technique, f"returned {type(options).__name__}, not its"
                                f" Options ({technique.Options.__name__}); set Options on the"
                                " class to the dataclass it returns")
        options = dataclasses.replace(options, **held)  # also options it does not search
        steps.append(Step(technique, options))
        if technique.stage is Stage.ARCHITECTURE:
            before = structure(model)
            try:
                model = returned_model(technique, technique.apply(handed_to_technique(model),
                                                                  options, ctx))
                check_still_classifies(technique, model, ctx)
            except Exception as error:
                raise SamplingFailed(Plan(tuple(steps)), error) from error
            if structure(model) == before:  # nothing it rewrites at these options
                steps.pop()
                continue
        claimed |= technique.claims
    return Plan(tuple(steps)), model


def _space_failed(steps: list[Step], technique: Technique, what: str) -> SamplingFailed:
    """A plugin's search_space that went wrong: its trial fails, recorded with the technique
    at its default options after the steps chosen before it."""
    return SamplingFailed(Plan((*steps, Step(technique, technique.Options()))),
                          TrialFailed(f"{technique.name}'s search_space {what}"))


def structure(model: nn.Module) -> tuple:
    """Every module's type and every tensor's shape, by name: what an architecture rewrite
    changes. A rewrite that leaves it as it was is left out of the plan, which would otherwise
    name a technique that did nothing (``se`` on a model of blocks it does not know)."""
    return (tuple((name, type(module)) for name, module in model.named_modules()),
            tuple((name, tuple(t.shape)) for name, t in model.state_dict().items()))


def fixed_plan(techniques: list[Technique], options: list[Any]) -> Plan:
    """A plan from explicit choices (``inspect --apply``); conflicts are refused."""
    claimed: dict[str, str] = {}
    for index, technique in enumerate(techniques):
        if technique in techniques[:index]:
            raise UsageError(f"technique {technique.name!r} is given twice; apply it once")
        for claim in technique.claims:
            if claim in claimed:
                raise UsageError(
                    f"techniques {claimed[claim]!r} and {technique.name!r} both rewrite the"
                    f" model's {claim}; apply only one of them"
                )
            claimed[claim] = technique.name
    steps = sorted((Step(t, o) for t, o in zip(techniques, options)),
                   key=lambda s: run_order(s.technique))
    return Plan(tuple(steps))


def does_not_apply(name: str, reason: str, after_rewrites: bool) -> str:
    """Why a step of a fixed plan cannot run; it blames earlier steps only when some rewrote
    the model before it."""
    return f"{name} does not apply{' after earlier steps' if after_rewrites else ''}: {reason}"


def handed_to_technique(model: nn.Module) -> nn.Module:
    """``model`` on the CPU, where every technique receives it: rewrites build their new layers
    there, while the trainer takes a model to its GPU to train or evaluate it and leaves it
    there. Handed over as it was, the first VGG-19 search on an H200 failed 422 of its 426
    trials, mixing CUDA and CPU tensors (a rewrite of the trained baseline, a pruner after
    training)."""
    return model.cpu()


def apply_stage(plan: Plan, stage: Stage, model: nn.Module, ctx: TrialContext,
                rebuild: bool = False) -> nn.Module:
    """Run (or, with ``rebuild``, re-create the structure of) one stage's steps in order."""
    for index, step in enumerate(plan.at(stage)):
        model = handed_to_technique(model)
        if stage is Stage.ARCHITECTURE:  # an earlier rewrite may have removed what it needs
            ok, reason = step.technique.applies_to(model)
            if not ok:
                raise TrialFailed(does_not_apply(step.name, reason, after_rewrites=index > 0))
        method = step.technique.rebuild if rebuild else step.technique.apply
        with running_step(step.name):
            model = returned_model(step.technique, method(model, step.options, ctx))
        if not rebuild:
            check_still_classifies(step.technique, model, ctx)
    return model


def returned_model(technique: Technique, result: Any) -> nn.Module:
    """What a technique's apply or rebuild returned, refused with its name unless a model (a
    plugin that changes the model in place and returns nothing, say)."""
    if not isinstance(result, nn.Module):
        raise TrialFailed(f"{technique.name} returned {type(result).__name__}, not the model;"
                          " its apply and rebuild must return the model they changed")
    return result


def check_still_classifies(technique: Technique, model: nn.Module, ctx: TrialContext) -> None:
    """Fail the trial, naming the technique, when the model it returned no longer turns one
    float32 image into one score per class. Otherwise the trial fails later, in training or
    evaluation, with an error that names no technique ("Target 8 is out of bounds" after a
    classifier with too few outputs, a dtype mismatch after a cast to float16)."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())),
                  torch.device("cpu"))
    modes = [(module, module.training) for module in model.modules()]
    try:
        with torch.no_grad():
            output = model.eval()(ctx.example_input().to(device))
    except Exception as error:
        raise TrialFailed(f"after {technique.name}, the model no longer runs on a float32"
                          f" input of shape {'x'.join(map(str, (1, *ctx.input_shape)))}"
                          f" ({type(error).__name__}: {error}); a technique must keep the"
                          " model's float32 input") from error
    finally:
        for module, training in modes:
            module.training = training
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != (1, ctx.num_classes):
        raise TrialFailed(f"after {technique.name}, the model returns {shape} for one image,"
                          f" not (1, {ctx.num_classes}): a technique must keep one score per"
                          " class")
