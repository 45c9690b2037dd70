"""The search's sampler, seeded per trial so that every process sampling one study differs.

A study is sampled by several processes at once: ``--n-jobs`` workers, and machines that join
through a shared ``--storage`` with the same command. Seeded once per process, two machines
that opened the study together drew the same random start-up plans and trained each twice
(a 12-trial digits search on two machines ran proxy trials 0/1, 2/3, 4/5 and 6/7 as pairs).
Each trial is sampled instead by a sampler seeded from the search's seed and the trial's
number, which the storage hands out once: no two processes share a stream, and one process
alone samples what it sampled before for the same study. The two are mixed by NumPy's
SeedSequence rather than added, so that a study of seed 1 does not draw the start-up plans
of seed 0's study one trial later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number`` of a search with ``seed``: the two mixed (not added, which
    would give trial n of seed 1 the seed of trial n + 1 of seed 0)."""
    return int(np.random.SeedSequence((seed, number)).generate_state(1)[0])


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Multivariate TPE with groups (the space is conditional), or random for comparison; either
    seeded per trial (TrialSeededSampler)."""
    if name == "random":
        return TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    # constant_liar: Optuna 5's default, and what every measured search ran with
    # (docs/performance.md, The sampler), stated so that another Optuna's default changes nothing
    return TrialSeededSampler(
        lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True, group=True,
                                             n_startup_trials=8, constant_liar=True), seed)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Samples each trial with a fresh sampler built with a seed drawn from the search's seed
    and the trial's number.

    TPE and random search keep no state between trials but their random streams and caches of
    the search space, which a fresh sampler works out again from the study's trials."""

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._build, self._seed = build, seed
        # told of trials it did not sample too: a dead worker's, failed by this process
        self._sampler = build(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler = self._build(trial_seed(self._seed, trial.number))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._sampler.after_trial(study, trial, state, values)
