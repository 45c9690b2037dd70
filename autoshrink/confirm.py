"""Proxy-then-confirm: search cheaply, then re-run only the Pareto candidates at full scale.

A proxy search (``--proxy-data`` share of the training data, ``--proxy-epochs`` share of the
epochs) ranks plans quickly; its Pareto members over all three metrics are then queued, with
their exact parameters, in a second study of the full task (``<name>-confirmed`` in the run
folder's ``confirmed/``), most reduced first (``autoshrink.candidates``: one that misses the
budget there hands its place on the fronts to the proxy plans it dominated), which trains its
own full baseline and measures them like any trial. Each starts from the options its
quantizers and pruners ended with in the proxy (a quantizer run finer, a pruner that kept fewer
steps), so the plan confirmed is the one the proxy reported.
Both results are reported side by side, since a proxy can flatter or hurt a plan.
"""

from __future__ import annotations

import logging

import optuna

from autoshrink.candidates import CandidatePool
from autoshrink.checkpoint import remove_unneeded
from autoshrink.config import SearchConfig
from autoshrink.pareto import baseline_from_study, records_from_study
from autoshrink.plugins import PluginHost
from autoshrink.report import reductions
from autoshrink.search import Search
from autoshrink.storage import PROXY_TRIAL_ATTR, retries_of
from autoshrink.task import Task

log = logging.getLogger(__name__)


def confirm(proxy: optuna.Study, config: SearchConfig,
            host: PluginHost) -> tuple[optuna.Study, SearchConfig, Task] | None:
    """Run the candidates on the full task; None when the proxy found none within budget."""
    pool = CandidatePool.from_proxy(proxy, config.budget)
    if not pool.candidates:
        log.info("no proxy trial meets the budget: nothing to confirm")
        return None
    # each plan in the pool at most once: the order, not the count, ends the confirmation
    full = config.confirmation(n_trials=len(pool.candidates))
    search = Search(full, host)
    study = search.prepare()
    pool.store_on(study)  # before any worker process starts: each keeps the queue filled
    search.candidates = pool
    waiting = pool.keep_queued(study, full.budget, depth=full.workers)
    if waiting:
        log.info(f"confirming the proxy's Pareto candidates on the full task in {full.run_dir}:"
                 f" {len(pool.order())} to start with, most reduced first; one that misses"
                 f" {full.budget:g} pp gives its place on the fronts to the next proxy plan")
        search.run_trials(study, search.trials_left(study))
    else:  # a resumed search whose confirmation ended: no process to start, nothing to run
        confirmed = {t.user_attrs.get(PROXY_TRIAL_ATTR) for t in study.get_trials(deepcopy=False)}
        log.info(f"all {len(confirmed - {None})} candidate(s) were confirmed in an earlier run")
    remove_unneeded(study, full.run_dir)
    return study, full, search.task


def comparison(proxy: optuna.Study, confirmed: optuna.Study) -> list[dict]:
    """One row per candidate: its proxy and its confirmed validation accuracy drop, its
    reductions against the full baseline, the seconds its proxy and its confirmed run took,
    and the plan as the confirmation ran it where that differs from the proxy's. A candidate
    that stepped into a front when one that dominated it missed the budget is marked so.

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
    pool = CandidatePool.from_study(confirmed)
    first_chosen = set(pool.order()) if pool is not None else set()
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
            # not a Pareto member of the proxy until a candidate that dominated it missed
            "stepped_in": pool is not None and number not in first_chosen,
            # the proxy's plan may run otherwise on the full task (a quantizer finer, a pruner
            # stopping at an earlier step): named only then
            "confirmed_plan": None if after is None or after.plan == before.plan else after.plan,
        })
    return rows
