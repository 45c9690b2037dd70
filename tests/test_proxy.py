"""Proxy-then-confirm: search on part of the data and epochs, confirm candidates on all of it."""

from __future__ import annotations

import csv
import json

import optuna


def test_proxy_search_confirms_its_pareto_candidates(tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "search", "--n-trials", "3", "--out", str(out), "--epochs", "12", "--finetune-epochs",
        "4", "--techniques", "prune-l1,quantize-int8", "--proxy-data", "0.5", "--proxy-epochs",
        "0.5", "--json")
    assert code == 0, err
    # the proxy trains on half the training split for half the epochs, the confirmation on all
    assert "574 train" in err and "baseline epoch 6/6" in err
    assert "1149 train" in err and "baseline epoch 12/12" in err
    payload = json.loads(stdout)
    proxy_members = {m["trial"] for front in payload["fronts"].values() for m in front["members"]}
    rows = payload["confirmation"]["candidates"]
    assert {row["proxy_trial"] for row in rows} == proxy_members and rows
    confirmed = optuna.load_study(study_name="digits-smallcnn-confirmed",
                                  storage=f"sqlite:///{out}/confirmed/study.db")
    proxy = optuna.load_study(study_name="digits-smallcnn", storage=f"sqlite:///{out}/study.db")
    for row in rows:  # the same plan, re-measured at full scale
        again = confirmed.trials[row["confirmed_trial"]]
        assert again.params == proxy.trials[row["proxy_trial"]].params
        assert again.user_attrs["plan_text"] == row["plan"]
    saved = list(csv.DictReader((out / "confirmation.csv").open()))
    assert [int(r["proxy_trial"]) for r in saved] == [r["proxy_trial"] for r in rows]
