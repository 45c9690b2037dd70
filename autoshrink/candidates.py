"""Which proxy plans a confirmation re-runs, and in what order, kept queued in its study.

A confirmation (``autoshrink.confirm``) re-measures the proxy's Pareto members on the full task.
Each candidate that misses the full budget leaves a hole in a front, which the proxy plans it
dominated could fill: so the order is worked out again after every confirmed trial, with the
plans that missed left out, and only the next few are queued. A Fashion-MNIST run queued
all of its 15 candidates at the start; its one candidate past 10x fewer MACs missed the budget
by 0.01 pp, and the next past 10x, dominated on the proxy by that one, waited 14th in the queue
when the time was up.

The pool (the proxy's trials within its budget: their measurements, parameters and plans) is
stored on the confirmation's study, where each worker process reads it: whichever process ends
a trial keeps the queue filled.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import optuna

from autoshrink.pareto import (
    METRICS,
    Baseline,
    TrialRecord,
    baseline_from_study,
    pareto_front,
    records_from_study,
)
from autoshrink.storage import EARLIER_RUN_ATTR, PROXY_TRIAL_ATTR, retries_of

POOL_ATTR = "candidate_pool"  # on the confirmation's study: CandidatePool as JSON
ACTIVE = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)


@dataclasses.dataclass(frozen=True)
class Candidate:
    record: TrialRecord  # as the proxy measured it
    params: dict  # the proxy trial's parameters, queued as they are
    plan: str  # the plan it ended with (a quantizer run finer, a pruner stopped early)


@dataclasses.dataclass(frozen=True)
class CandidatePool:
    """The proxy's trials within its budget, against the proxy's baseline."""

    candidates: tuple[Candidate, ...]
    baseline: Baseline
    max_drop: float  # the proxy's budget
    searched: tuple[str, ...]  # the proxy's objectives: their fronts come first

    @classmethod
    def from_proxy(cls, proxy: optuna.Study, max_drop: float) -> CandidatePool:
        baseline = baseline_from_study(proxy)
        trials = proxy.get_trials(deepcopy=False)  # listed by number
        candidates = tuple(
            Candidate(r, trials[r.number].params, trials[r.number].user_attrs["plan"])
            for r in records_from_study(proxy) if r.feasible(baseline, max_drop))
        return cls(candidates, baseline, max_drop, tuple(proxy.user_attrs.get("objectives", [])))

    @classmethod
    def from_study(cls, confirmation: optuna.Study) -> CandidatePool | None:
        """The pool stored on a confirmation's study; None for any other study."""
        stored = confirmation.user_attrs.get(POOL_ATTR)
        if stored is None:
            return None
        pool = json.loads(stored)
        return cls(tuple(Candidate(TrialRecord(**c["record"]), c["params"], c["plan"])
                         for c in pool["candidates"]),
                   Baseline(**pool["baseline"]), pool["max_drop"], tuple(pool["searched"]))

    def store_on(self, confirmation: optuna.Study) -> None:
        confirmation.set_user_attr(POOL_ATTR, json.dumps(dataclasses.asdict(self)))

    def order(self, left_out: frozenset[int] = frozenset()) -> list[int]:
        """Proxy trial numbers of the Pareto members over every metric, once ``left_out`` is
        taken from the pool, in the order to confirm them: the most reduced member of each
        searched objective's front, then the next of each, and so on; the fronts of the metrics
        the search did not optimise (reported all the same) follow in the same way.

        What comes first is what gets measured when time runs out: taking the size front in
        turn put a 23x params candidate of a Fashion-MNIST run seventh, behind its time."""
        records = [c.record for c in self.candidates if c.record.number not in left_out]
        numbers: dict[int, None] = {}
        for metrics in (self.searched, [m for m in METRICS if m not in self.searched]):
            fronts = [pareto_front(records, metric, self.baseline, self.max_drop).members
                      for metric in metrics]
            numbers |= dict.fromkeys(r.number for rank in itertools.zip_longest(*fronts)
                                     for r in rank if r is not None)  # first place each keeps
        return list(numbers)

    def still_to_queue(self, confirmation: optuna.Study, max_drop: float) -> list[int]:
        """The candidates, in order, that the confirmation has not yet queued or run, with the
        ones it measured beyond ``max_drop`` (or that failed or were stopped early) left out of
        the fronts: the proxy plans they dominated step into their places."""
        claimed, missed = self._outcomes(confirmation, max_drop)
        return [n for n in self.order(frozenset(missed)) if n not in claimed]

    def left_to_run(self, confirmation: optuna.Study, max_drop: float) -> int:
        """The candidates queued and those still to queue (a miss may add more later)."""
        return _waiting(confirmation) + len(self.still_to_queue(confirmation, max_drop))

    def keep_queued(self, confirmation: optuna.Study, max_drop: float, depth: int) -> int:
        """Queue the next candidates until ``depth`` wait; returns how many wait.

        Each process calls this before it asks for its next trial, with ``depth`` at least the
        number of processes: between two calls of one process the others take at most one
        trial each, so a process never finds the queue empty while a candidate is left (and
        would otherwise run a plan of the sampler's own)."""
        waiting = _waiting(confirmation)
        by_number = {c.record.number: c for c in self.candidates}
        for number in self.still_to_queue(confirmation, max_drop)[:max(0, depth - waiting)]:
            candidate = by_number[number]
            confirmation.enqueue_trial(candidate.params, user_attrs={
                PROXY_TRIAL_ATTR: number, EARLIER_RUN_ATTR: candidate.plan})
            waiting += 1
        return waiting

    @staticmethod
    def _outcomes(confirmation: optuna.Study, max_drop: float) -> tuple[set[int], set[int]]:
        """Proxy trial numbers the confirmation has queued or run, and of those the ones that
        missed: measured beyond ``max_drop``, or failed or stopped early with no run of the
        plan waiting or running in its place (an interrupted trial is queued again)."""
        trials = confirmation.get_trials(deepcopy=False)
        if not any(PROXY_TRIAL_ATTR in t.user_attrs for t in trials):
            return set(), set()
        baseline = baseline_from_study(confirmation)
        measured = {r.number: r for r in records_from_study(confirmation)}
        retried = retries_of(confirmation)
        claimed, kept, ended = set(), set(), set()
        for trial in trials:
            number, record = trial.user_attrs.get(PROXY_TRIAL_ATTR), measured.get(trial.number)
            if number is None:
                continue
            claimed.add(number)
            if trial.state in ACTIVE or (record is not None
                                         and record.feasible(baseline, max_drop)):
                kept.add(number)
            elif (trial.number not in retried  # a retry given up is recorded without the attr
                  or trials[retried[trial.number]].system_attrs.get("given_up")):
                ended.add(number)
        return claimed, ended - kept


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
