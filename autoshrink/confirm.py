"""Proxy-then-confirm: search cheaply, then re-run only the Pareto candidates at full scale.

A proxy search (``--proxy-data`` share of the training data, ``--proxy-epochs`` share of the
epochs) ranks plans quickly; its Pareto members over all three metrics are then queued, with
their exact parameters, in a second study of the full task (``<name>-confirmed`` in the run
folder's ``confirmed/``), most reduced first, which trains its own full baseline and measures
them like any trial. Each starts from the options its quantizers and pruners ended with in the
proxy (a quantizer run finer, a pruner that kept fewer steps), so the plan confirmed is the one
the proxy reported.
Both results are reported side by side, since a proxy can flatter or hurt a plan.
"""

from __future__ import annotations

import itertools
import logging

import optuna

from autoshrink.checkpoint import remove_unneeded
from autoshrink.config import SearchConfig
from autoshrink.pareto import METRICS, baseline_from_study, pareto_front, records_from_study
from autoshrink.plugins import PluginHost
from autoshrink.report import reductions
from autoshrink.search import Search
from autoshrink.storage import EARLIER_RUN_ATTR, PROXY_TRIAL_ATTR, retries_of
from autoshrink.task import Task

log = logging.getLogger(__name__)


def candidates(study: optuna.Study, max_drop: float) -> list[optuna.trial.FrozenTrial]:
    """The proxy study's Pareto members over every metric, in the order to confirm them.

    Confirmation can run out of time, so what comes first is what gets measured: the most
    reduced member of each searched objective's front, then the next of each, and so on; the
    fronts of metrics the search did not optimise (reported all the same) follow in the same
    way. In one Fashion-MNIST run, taking the size front in turn put a 23x params candidate
    seventh, behind the time the confirmation had.
    """
    baseline, records = baseline_from_study(study), records_from_study(study)
    searched = list(study.user_attrs.get("objectives", []))
    numbers: dict[int, None] = {}
    for metrics in (searched, [m for m in METRICS if m not in searched]):
        fronts = [pareto_front(records, metric, baseline, max_drop).members
                  for metric in metrics]
        numbers |= dict.fromkeys(r.number for rank in itertools.zip_longest(*fronts)
                                 for r in rank if r is not None)  # first place each keeps
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [by_number[n] for n in numbers]


def confirm(proxy: optuna.Study, config: SearchConfig,
            host: PluginHost) -> tuple[optuna.Study, SearchConfig, Task] | None:
    """Run the candidates on the full task; None when the proxy found none within budget."""
    chosen = candidates(proxy, config.budget)
    if not chosen:
        log.info("no proxy trial meets the budget: nothing to confirm")
        return None
    full = config.confirmation(n_trials=len(chosen))
    log.info(f"confirming {len(chosen)} Pareto candidate(s) on the full task in {full.run_dir}")
    search = Search(full, host)
    study = search.prepare()
    queued = {t.user_attrs.get(PROXY_TRIAL_ATTR) for t in study.get_trials(deepcopy=False)}
    for trial in chosen:
        if trial.number not in queued:
            study.enqueue_trial(trial.params, user_attrs={
                PROXY_TRIAL_ATTR: trial.number, EARLIER_RUN_ATTR: trial.user_attrs["plan"]})
    if (left := search.trials_left(study)) > 0:
        search.run_trials(study, left)
    else:  # a resumed search whose confirmation ended: no process to start, nothing to run
        log.info(f"all {len(chosen)} candidate(s) were confirmed in an earlier run")
    remove_unneeded(study, full.run_dir)
    return study, full, search.task


def comparison(proxy: optuna.Study, confirmed: optuna.Study) -> list[dict]:
    """One row per candidate: its proxy and its confirmed validation accuracy drop, its
    reductions against the full baseline, the seconds its proxy and its confirmed run took,
    and the plan as the confirmation ran it where that differs from the proxy's.

    The seconds are what a user plans the next run by: the confirmation often ends at its
    ``--timeout`` with candidates waiting (a Fashion-MNIST run confirmed 4 of 12, each taking
    6-21 minutes on one core, 8-14 times its proxy trial).

    The reductions are the confirmed model's, the one the fronts list and ``export`` writes; a
    pruner that stopped at an earlier step on the full task leaves it more parameters than the
    proxy's. A candidate not confirmed (its trial waiting, failed or stopped) shows the proxy's."""
    proxy_base, full_base = baseline_from_study(proxy), baseline_from_study(confirmed)
    proxy_records = {r.number: r for r in records_from_study(proxy)}
    full_records = {r.number: r for r in records_from_study(confirmed)}
    queued_again = retries_of(confirmed)  # interrupted: the run queued in its place counts
    rows = []
    for trial in confirmed.get_trials(deepcopy=False):
        number = trial.user_attrs.get(PROXY_TRIAL_ATTR)
        if number not in proxy_records or trial.number in queued_again:
            continue
        before, after = proxy_records[number], full_records.get(trial.number)
        rows.append({
            "proxy_trial": number, "confirmed_trial": trial.number, "plan": before.plan,
            "proxy_drop_pp": round(before.drop_pp(proxy_base), 2),
            "confirmed_drop_pp": None if after is None else round(after.drop_pp(full_base), 2),
            "confirmed_test_acc_%": None if after is None or after.test_accuracy is None
            else round(after.test_accuracy * 100, 2),
            **reductions(before if after is None else after, full_base),
            "proxy_seconds": round(before.seconds, 1),
            "confirmed_seconds": None if after is None else round(after.seconds, 1),
            "state": trial.state.name.lower(),
            # the proxy's plan may run otherwise on the full task (a quantizer finer, a pruner
            # stopping at an earlier step): named only then
            "confirmed_plan": None if after is None or after.plan == before.plan else after.plan,
        })
    return rows
