"""Proxy-then-confirm: search on part of the data and epochs, confirm candidates on all of it."""

from __future__ import annotations

import csv
import json

import optuna
import pytest


def sampled_plan(trial: optuna.trial.FrozenTrial) -> str:
    return trial.user_attrs.get("sampled_plan_text", trial.user_attrs["plan_text"])


def test_proxy_search_confirms_its_pareto_candidates(tmp_path, run_cli):
    """Candidates are the proxy's Pareto members under the proxy's own budget (tighter here),
    re-measured on the full task against --max-drop."""
    out = tmp_path / "run"
    argv = ("search", "--n-trials", "3", "--out", str(out), "--epochs", "12", "--finetune-epochs",
            "4", "--techniques", "prune-l1,quantize-int8", "--proxy-data", "0.5", "--proxy-epochs",
            "0.5", "--max-drop", "6", "--proxy-max-drop", "3", "--json",
            "--seed", "23")  # no other test's baselines: both are trained here
    code, stdout, err = run_cli(*argv)
    assert code == 0, err
    # the proxy trains on half the training split for half the epochs, the confirmation on all
    assert "574 train" in err and "baseline epoch 6/6" in err
    assert "1149 train" in err and "baseline epoch 12/12" in err
    payload = json.loads(stdout)
    assert payload["max_drop"] == 3 and payload["confirmation"]["max_drop"] == 6
    proxy_members = {m["trial"] for front in payload["fronts"].values() for m in front["members"]}
    rows = payload["confirmation"]["candidates"]
    assert {row["proxy_trial"] for row in rows} == proxy_members and rows
    # the candidates planned, not the proxy's trials within its budget they are drawn from
    assert (f"study 'digits-smallcnn-confirmed': 0 trials done, running up to"
            f" {len(proxy_members)} more") in err
    confirmed = optuna.load_study(study_name="digits-smallcnn-confirmed",
                                  storage=f"sqlite:///{out}/confirmed/study.db")
    proxy = optuna.load_study(study_name="digits-smallcnn", storage=f"sqlite:///{out}/study.db")
    # candidates only: no plan of the sampler's own, none started after the last was taken
    assert all("proxy_trial" in t.user_attrs and "surplus" not in t.user_attrs
               for t in confirmed.trials)
    for study, budget in ((proxy, 3), (confirmed, 6)):  # what the sampler was told
        for trial in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
            drop = trial.user_attrs["accuracy_drop_pp"]
            assert trial.system_attrs["constraints"] == [pytest.approx(drop - budget)]
            assert trial.user_attrs["feasible"] == (drop <= budget)
    for row in rows:  # the same plan, re-measured at full scale
        again, before = confirmed.trials[row["confirmed_trial"]], proxy.trials[row["proxy_trial"]]
        assert again.params == before.params
        assert sampled_plan(again) == sampled_plan(before)
        assert before.user_attrs["plan_text"] == row["plan"]
        # how each ran it: a pruner may stop at another step on the full task
        assert row["confirmed_plan"] == (None if again.user_attrs["plan_text"] == row["plan"]
                                         else again.user_attrs["plan_text"])
    saved = list(csv.DictReader((out / "confirmation.csv").open()))
    assert [int(r["proxy_trial"]) for r in saved] == [r["proxy_trial"] for r in rows]
    code, again, err = run_cli(*argv)  # the same command again: both studies are complete
    assert code == 0, err
    assert f"all {len(rows)} candidate(s) were confirmed in an earlier run" in err
    assert "trials done, running up to" not in err and json.loads(again)["confirmation"] == (
        payload["confirmation"])
    for flags, budget in (([], 3), (["--max-drop", "6"], 6)):  # the proxy's budget, or as given
        code, stdout, err = run_cli("report", "--out", str(out), "--json", *flags)
        assert code == 0, err
        assert json.loads(stdout)["max_drop"] == budget


def ranked_proxy_study() -> optuna.Study:
    """A proxy study of seven trials against a baseline of 1000 parameters and MACs at 90 %."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("objectives", ["params", "flops"])
    study.set_user_attr("baseline", json.dumps({
        "val_accuracy": 0.9, "test_accuracy": 0.9, "params": 1000, "nonzero_params": 1000,
        "macs": 1000, "size_bytes": 4000, "latency_ms": 1.0, "train_seconds": 1.0}))
    trials = [  # (val accuracy, params, MACs)
        (0.89, 500, 100),  # 0: the MACs front's smallest
        (0.89, 100, 600),  # 1: the params front's smallest
        (0.90, 300, 300),  # 2: second on both fronts
        (0.70, 10, 10),  # 3: over the 2 pp budget
        (0.895, 200, 800),  # 4: second on params only
        (0.885, 1, 900),  # 5: the size front's smallest, on no searched front (4 bytes)
        (0.88, 150, 700),  # 6: on no front, dominated on params by 1 alone
    ]
    for number, (accuracy, params, macs) in enumerate(trials):
        nonzero = 1000 if number == 5 else params  # 5: a dense layout, a tiny artifact
        metrics = {"val_accuracy": accuracy, "params": nonzero, "nonzero_params": nonzero,
                   "macs": macs, "size_bytes": 4 * params, "latency_ms": 1.0, "seconds": 1.0}
        study.add_trial(optuna.trial.create_trial(
            values=[accuracy, nonzero, macs],
            user_attrs={"metrics": metrics, "plan": f'[["plan-{number}", {{}}]]'}))
    return study


def test_candidates_come_most_reduced_first_taking_each_front_in_turn():
    """If time runs out, the candidates measured are the searched fronts' smallest members;
    a member only of an unsearched metric's front comes after them."""
    from autoshrink.candidates import CandidatePool

    pool = CandidatePool.from_proxy(ranked_proxy_study(), 2.0)
    assert sorted(c.record.number for c in pool.candidates) == [0, 1, 2, 4, 5, 6]
    assert pool.order() == [1, 0, 4, 2, 5]


def measure_next(confirmation: optuna.Study, accuracy: float | None) -> int:
    """Run the next queued candidate: measured at ``accuracy``, or failed when None; returns
    its proxy trial."""
    trial = confirmation.ask()
    if accuracy is None:
        trial.set_user_attr("error", "a plugin raised")
        confirmation.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        trial.set_user_attr("metrics", {**PROXY_METRICS, "val_accuracy": accuracy})
        confirmation.tell(trial, [accuracy, 100, 100])
    return trial.user_attrs["proxy_trial"]


def test_a_candidate_that_misses_the_budget_hands_its_place_to_the_plan_it_dominated():
    """The confirmation queues only as many candidates as it has processes, and works out the
    next after each trial: once the params front's smallest measures beyond the budget, the
    proxy plan that only it dominated is next, ahead of the fronts' second members (which the
    order worked out at the start would have run first, and never this plan). A candidate
    that failed leaves its place too; one confirmed within the budget keeps it."""
    from autoshrink.candidates import CandidatePool
    from autoshrink.confirm import comparison

    proxy = ranked_proxy_study()
    confirmation = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    confirmation.set_user_attr("baseline", proxy.user_attrs["baseline"])
    CandidatePool.from_proxy(proxy, 2.0).store_on(confirmation)
    pool = CandidatePool.from_study(confirmation)  # as a worker process reads it
    assert pool.keep_queued(confirmation, 2.0, depth=2) == 2
    assert measure_next(confirmation, 0.85) == 1  # 5 pp: missed
    assert pool.keep_queued(confirmation, 2.0, depth=2) == 2
    queued = [t.user_attrs["proxy_trial"] for t in confirmation.trials]
    assert queued == [1, 0, 6]
    assert confirmation.trials[2].user_attrs["earlier_run_plan"] == '[["plan-6", {}]]'
    assert measure_next(confirmation, 0.89) == 0  # kept: nothing new steps in
    assert measure_next(confirmation, None) == 6  # failed: the params front falls back to 4
    assert pool.keep_queued(confirmation, 2.0, depth=2) == 2
    assert [t.user_attrs["proxy_trial"] for t in confirmation.trials] == [1, 0, 6, 4, 2]
    for _ in range(2):
        measure_next(confirmation, 0.89)
    assert pool.keep_queued(confirmation, 2.0, depth=2) == 1  # the size front's 5 is left
    measure_next(confirmation, 0.89)
    assert pool.keep_queued(confirmation, 2.0, depth=2) == 0  # nothing more worth confirming
    stepped_in = {row["proxy_trial"]: row["stepped_in"] for row in comparison(proxy, confirmation)}
    assert stepped_in == {1: False, 0: False, 6: True, 4: False, 2: False, 5: False}
    assert CandidatePool.from_study(optuna.create_study()) is None  # a search that confirms nothing


def test_a_candidate_is_confirmed_from_the_bits_its_quantizer_ended_with(tmp_path, run_cli,
                                                                         monkeypatch):
    """2-bit k-means takes the proxy's model below its budget, so the proxy's quantizer runs
    finer; the confirmation starts from the bits the proxy reported, not the sampled 2 (from
    which, with the full task's model before quantization below its floor, it would not run
    finer at all: a candidate confirmed as another plan than the proxy's)."""
    from autoshrink_plugins.weight_sharing import Kmeans

    quantized_at, apply = [], Kmeans.apply

    def recording_apply(self, model, options, ctx):
        quantized_at.append(options.bits)
        return apply(self, model, options, ctx)
    monkeypatch.setattr(Kmeans, "apply", recording_apply)
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "search", "--n-trials", "1", "--n-jobs", "1", "--out", str(out), "--epochs", "12",
        "--finetune-epochs", "4", "--techniques", "quantize-kmeans", "--start-plan",
        "quantize-kmeans(bits=2)", "--proxy-data", "0.5", "--proxy-epochs", "0.5",
        "--max-drop", "6", "--proxy-max-drop", "3", "--json", "--seed", "23")
    assert code == 0, err
    proxy = optuna.load_study(study_name="digits-smallcnn", storage=f"sqlite:///{out}/study.db")
    [(_, options)] = json.loads(proxy.trials[0].user_attrs["plan"])
    reported = options["bits"]
    assert quantized_at[:reported - 1] == list(range(2, reported + 1))  # 2 bits, then finer
    assert quantized_at[reported - 1] == reported  # the confirmation's first
    confirmed = optuna.load_study(study_name="digits-smallcnn-confirmed",
                                  storage=f"sqlite:///{out}/confirmed/study.db")
    again = confirmed.trials[0]
    assert again.params["quantize-kmeans.bits"] == 2  # the proxy trial's parameters...
    assert again.user_attrs["sampled_plan_text"] == "quantize-kmeans(bits=2)"  # ...as sampled
    [(_, ended)] = json.loads(again.user_attrs["plan"])
    assert ended["bits"] >= reported  # finer only where the full task needs it


# a baseline of 1000 parameters and MACs in 4000 bytes, and proxy trials each ten times smaller
KMEANS_BITS = {"quantize-kmeans.bits": optuna.distributions.IntDistribution(2, 6)}
PROXY_METRICS = {"val_accuracy": 0.89, "params": 100, "nonzero_params": 100, "macs": 100,
                 "size_bytes": 400, "latency_ms": 1.0, "seconds": 1.0}


def proxy_and_confirmation_studies(candidates: int) -> tuple[optuna.Study, optuna.Study]:
    """A proxy study of ``candidates`` trials (k-means at 2, 3, ... bits) and an empty
    confirmation study, both with the baseline above."""
    baseline = json.dumps({"val_accuracy": 0.9, "test_accuracy": 0.9, "params": 1000,
                           "nonzero_params": 1000, "macs": 1000, "size_bytes": 4000,
                           "latency_ms": 1.0, "train_seconds": 1.0})
    proxy, confirmed = (optuna.create_study(directions=["maximize", "minimize"])
                        for _ in range(2))
    for study in (proxy, confirmed):
        study.set_user_attr("baseline", baseline)
    for bits in range(2, 2 + candidates):
        proxy.add_trial(optuna.trial.create_trial(
            values=[0.89, 100], params={"quantize-kmeans.bits": bits}, distributions=KMEANS_BITS,
            user_attrs={"metrics": PROXY_METRICS, "plan_text": f"quantize-kmeans(bits={bits})"}))
    return proxy, confirmed


def test_a_candidates_reductions_are_those_of_its_confirmed_model():
    """A pruner that stopped earlier on the full task leaves the confirmed model larger than
    the proxy's: its row says what the confirmed model, the one exported, measures; a candidate
    still waiting shows the proxy's. Each row also says how long each of its runs took."""
    from autoshrink.confirm import comparison

    proxy, confirmed = proxy_and_confirmation_studies(candidates=2)
    larger = {**PROXY_METRICS, "nonzero_params": 250, "params": 250, "macs": 200,
              "size_bytes": 1000, "seconds": 12.34}
    confirmed.add_trial(optuna.trial.create_trial(
        values=[0.89, 250], params={"quantize-kmeans.bits": 2}, distributions=KMEANS_BITS,
        user_attrs={"proxy_trial": 0, "metrics": larger, "plan_text": "quantize-kmeans(bits=2)"}))
    confirmed.enqueue_trial({"quantize-kmeans.bits": 3}, user_attrs={"proxy_trial": 1})
    rows = {row["proxy_trial"]: row for row in comparison(proxy, confirmed)}
    reductions = [(rows[n]["params_x"], rows[n]["macs_x"], rows[n]["size_x"]) for n in (0, 1)]
    assert reductions == [(4.0, 5.0, 4.0), (10.0, 10.0, 10.0)]
    assert (rows[0]["state"], rows[1]["state"]) == ("complete", "waiting")
    # what each run took: the proxy's for both, the confirmation's once it ran
    times = [(rows[n]["proxy_seconds"], rows[n]["confirmed_seconds"]) for n in (0, 1)]
    assert times == [(1.0, 12.3), (1.0, None)]


def test_a_confirmation_trial_queued_again_after_an_interruption_still_confirms_its_candidate():
    """The run queued in an interrupted trial's place keeps what the trial was queued with
    (the proxy trial, the plan it ended with there), so the comparison reads its result in
    the candidate's row, not the interrupted run's nothing."""
    from autoshrink.confirm import comparison
    from autoshrink.storage import (
        EARLIER_RUN_ATTR,
        QUEUED_WITH,
        START_PLAN_ATTR,
        retry_interrupted,
    )

    assert START_PLAN_ATTR in QUEUED_WITH
    proxy, confirmed = proxy_and_confirmation_studies(candidates=1)
    queued_with = {"proxy_trial": 0, EARLIER_RUN_ATTR: '[["quantize-kmeans", {"bits": 4}]]'}
    confirmed.add_trial(optuna.trial.create_trial(  # interrupted: failed without an error
        state=optuna.trial.TrialState.FAIL, params={"quantize-kmeans.bits": 2},
        distributions=KMEANS_BITS, user_attrs={**queued_with, "timing": {"total": 9.0}}))
    assert retry_interrupted(confirmed, confirmed.trials[0])
    again = confirmed.trials[1]
    assert again.state == optuna.trial.TrialState.WAITING and again.user_attrs == queued_with
    run = confirmed.ask()  # the queued run, measured
    run.set_user_attr("metrics", {**PROXY_METRICS, "val_accuracy": 0.88})
    confirmed.tell(run, [0.88, 100])
    [row] = comparison(proxy, confirmed)
    assert (row["proxy_trial"], row["confirmed_trial"], row["state"]) == (0, 1, "complete")
    assert row["confirmed_drop_pp"] == 2.0
