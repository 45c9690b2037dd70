"""The search's sampler: processes sharing a study sample apart, one process samples alike."""

from __future__ import annotations

import copy

import optuna
import torch

from autoshrink.plan import sample_plan
from autoshrink.sampler import make_sampler, trial_seed
from autoshrink.technique import TrialContext

SHAPE = (1, 16, 16)


def sample_in_turn(host, studies: list[optuna.Study], rounds: int) -> list[list[dict]]:
    """Each study (a process) asks for a trial and samples a smallcnn plan in turn; returns
    the parameters each process drew, in its order."""
    base = host.model("smallcnn").build(10, 1, 16)
    drawn = [[] for _ in studies]
    for _ in range(rounds):
        for study, params in zip(studies, drawn, strict=True):
            trial = study.ask()
            sample_plan(trial, host.techniques, copy.deepcopy(base), TrialContext(SHAPE, 10))
            params.append(trial.params)
            study.tell(trial, [0.9, 1000.0])
    return drawn


def opened(storage: str, name: str, sampler: str = "tpe", seed: int = 0) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                               directions=["maximize", "minimize"],
                               sampler=make_sampler(sampler, seed=seed))


def test_machines_running_the_same_command_sample_different_plans(host, tmp_path):
    """Two processes with the same --seed on one study (two machines, or a search and its
    worker) drew the same start-up plans in pairs before the sampler was seeded per trial."""
    torch.manual_seed(0)
    storage = f"sqlite:///{tmp_path}/shared.db"
    for sampler in ("tpe", "random"):
        first, second = sample_in_turn(host, [opened(storage, sampler, sampler),
                                              opened(storage, sampler, sampler)], rounds=5)
        assert all(a != b for a, b in zip(first, second, strict=True)), sampler


def test_one_process_samples_the_same_plans_for_the_same_seed(host, tmp_path):
    torch.manual_seed(0)
    runs = [sample_in_turn(host, [opened(f"sqlite:///{tmp_path}/{run}.db", "s")], rounds=10)[0]
            for run in ("a", "b")]
    assert runs[0] == runs[1]
    assert len({str(p) for p in runs[0]}) == 10  # and each trial its own plan


def test_searches_of_neighbouring_seeds_do_not_share_plans_a_trial_apart(host, tmp_path):
    """With the seed and the trial number added, seed 1's trial k drew seed 0's trial k + 1."""
    torch.manual_seed(0)
    first, second = (sample_in_turn(host, [opened(f"sqlite:///{tmp_path}/{seed}.db", "s",
                                                  seed=seed)], rounds=4)[0] for seed in (0, 1))
    assert all(a != b for a, b in zip(first[1:], second, strict=False))


def test_trials_of_neighbouring_seeds_train_with_unrelated_torch_seeds():
    """A trial's training is seeded like its sampler (it was the seed plus the number too)."""
    seeds = {(seed, number): trial_seed(seed, number) for seed in range(3) for number in range(50)}
    assert len(set(seeds.values())) == len(seeds)
    assert trial_seed(1, 7) == seeds[1, 7]  # the same trial of the same search: the same seed


def test_a_process_fails_a_trial_another_one_sampled(tmp_path):
    """A search finds a dead worker's trial and fails it before it samples one of its own."""
    storage = f"sqlite:///{tmp_path}/shared.db"
    dead = opened(storage, "s").ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    starting = opened(storage, "s")
    starting.tell(dead.number, state=optuna.trial.TrialState.FAIL)
    assert starting.trials[0].state == optuna.trial.TrialState.FAIL
