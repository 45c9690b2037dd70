"""Starting plans: plans a search measures first, before its sampler proposes any.

A plan is written as reports print it (``gap-classifier + prune-l1(amount=0.5, steps=6) @ 50%
epochs``), so a plan copied from one study's front can start another. Each becomes an Optuna
trial queued with fixed parameters: every other technique off, every searched option of its
techniques at the plan's value (a default where the text names none). Everything is checked
before the baseline trains, against the same search spaces the trials sample from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import optuna

from autoshrink.errors import UsageError
from autoshrink.plan import TRAINING_LENGTH_PARAM, Plan, ScopedTrial, Step
from autoshrink.plan_text import parse_plan_text
from autoshrink.storage import START_PLAN_ATTR  # on a queued trial: the plan as given
from autoshrink.technique import Technique, options_to_dict


@dataclasses.dataclass(frozen=True)
class StartTrial:
    text: str  # the plan as the reports spell it
    params: dict[str, Any]  # what Optuna is told to suggest


class _RecordingTrial:
    """Stands in for an Optuna trial while a technique's search_space runs: answers each
    suggestion with the plan's value and keeps the distribution it was asked from."""

    def __init__(self, wanted: Mapping[str, Any]):
        self.wanted, self.asked = wanted, {}

    def _answer(self, name: str, distribution: optuna.distributions.BaseDistribution) -> Any:
        self.asked[name] = distribution
        if name not in self.wanted:
            raise _NotAnOption(name)
        return self.wanted[name]

    def suggest_int(self, name, low, high, step=1, log=False):
        return self._answer(name, optuna.distributions.IntDistribution(low, high, log=log,
                                                                        step=step))

    def suggest_float(self, name, low, high, *, step=None, log=False):
        return self._answer(name, optuna.distributions.FloatDistribution(low, high, log=log,
                                                                          step=step))

    def suggest_categorical(self, name, choices):
        return self._answer(name, optuna.distributions.CategoricalDistribution(choices))


class _NotAnOption(Exception):
    """A search space asked for a parameter that is none of its technique's options."""


def _inside(value: Any, distribution: optuna.distributions.BaseDistribution) -> bool:
    """Whether the sampler could suggest ``value``. Not Optuna's ``_contains``: that is private,
    takes the internal representation and compares floats exactly, and a value typed as text
    (``amount=0.35``) is a step count with rounding error; a bool is never a number here."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return any(type(value) is type(c) and value == c for c in distribution.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not distribution.low - 1e-9 <= value <= distribution.high + 1e-9:
        return False
    step = distribution.step
    return step is None or math.isclose((value - distribution.low) / step,
                                        round((value - distribution.low) / step), abs_tol=1e-6)


def _choices(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return ", ".join(map(str, distribution.choices))
    step = f" in steps of {distribution.step:g}" if distribution.step else ""
    return f"{distribution.low:g} to {distribution.high:g}{step}"


def step_params(text: str, step: Step, held: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters under which a search samples ``step``; an option the plan sets that
    the search would not sample as given is refused, naming what it would."""
    name = step.name
    options = options_to_dict(step.options)
    recorder = _RecordingTrial({f"{name}.{key}": value for key, value in options.items()})
    try:
        step.technique.search_space(ScopedTrial(recorder, name, held))
    except _NotAnOption as error:
        raise UsageError(f"starting plan {text!r}: {name}'s search space samples {error}, which"
                         " is none of its options, so a starting plan cannot set it; leave"
                         f" {name} out of the starting plan") from None
    defaults, params = options_to_dict(step.technique.Options()), {}
    for key, value in options.items():
        full = f"{name}.{key}"
        distribution = recorder.asked.get(full)
        if key in held and value != held[key]:
            raise UsageError(f"starting plan {text!r}: {full}={value}, but the search holds it at"
                             f" {held[key]} (--set or the preset); leave it out of the plan")
        if distribution is None:
            if key not in held and value != defaults[key]:
                raise UsageError(f"starting plan {text!r}: {full} is not searched, so a starting"
                                 " plan cannot set it; hold it for the whole search with --set"
                                 f" {name}:{key}={value}")
        elif not _inside(value, distribution):
            raise UsageError(f"starting plan {text!r}: {full}={value} is outside what the"
                             f" search samples ({_choices(distribution)}); choose one of those")
        else:
            params[full] = value
    return params


def start_trials(texts: tuple[str, ...], techniques: Mapping[str, Technique],
                 searched: Mapping[str, Technique], fixed: Mapping[str, Mapping[str, Any]],
                 lengths: tuple[float, ...]) -> list[StartTrial]:
    """Each starting plan as the fixed parameters of a queued trial. ``techniques`` are the
    installed ones (to parse), ``searched`` the ones this search samples, ``fixed`` the held
    options (typed) and ``lengths`` the training lengths it offers."""
    trials = []
    for text in texts:
        plan, length = parse_plan_text(text, techniques, fixed, "starting plan")
        names = {step.name for step in plan.steps}
        if outside := sorted(names - set(searched)):
            raise UsageError(f"starting plan {text!r}: {', '.join(outside)} is not searched"
                             " (--techniques/--exclude); search it or leave it out of the plan")
        params: dict[str, Any] = {f"use.{name}": name in names for name in searched}
        for step in plan.steps:
            params |= step_params(text, step, fixed.get(step.name, {}))
        chosen = _training_length(text, plan, length, lengths)
        if plan.retrains and len(lengths) > 1:  # only then does a trial sample its length
            params[TRAINING_LENGTH_PARAM] = chosen
        trials.append(StartTrial(dataclasses.replace(plan, training_length=chosen).describe(),
                                 params))
    return trials


def _training_length(text: str, plan: Plan, length: float | None,
                     lengths: tuple[float, ...]) -> float:
    """The share of the epochs the plan trains for: the one the text gives, else the longest
    the search offers (1 for a plan that trains nothing)."""
    if not plan.retrains:
        if length is not None:
            raise UsageError(f"starting plan {text!r} trains nothing (no rewrite or training"
                             " technique), so it takes no '@ N% epochs'; drop that part")
        return 1.0
    if length is None:
        return max(lengths)
    for offered in lengths:
        if math.isclose(length, offered):
            return offered
    offered = ", ".join(f"{share:.0%}" for share in sorted(lengths))
    raise UsageError(f"starting plan {text!r}: {length:.0%} epochs is not a training length"
                     f" this search offers ({offered}, --training-lengths); use one of those")


def queue_start_trials(study: optuna.Study, trials: list[StartTrial]) -> None:
    """Queue each starting plan once per study: a resumed search does not queue it again."""
    for trial in trials:
        study.enqueue_trial(trial.params, user_attrs={START_PLAN_ATTR: trial.text},
                            skip_if_exists=True)
