"""The engine end to end through the real command: search, resume, report, constraints."""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import os
from types import SimpleNamespace

import optuna
import pytest

from autoshrink import config as config_module
from autoshrink.config import SearchConfig
from autoshrink.errors import BaselineDidNotLearn
from autoshrink.search import count_distinct_finished
from tests.conftest import FAST
from tests.test_cli_errors import assert_one_clear_line


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One small finished search shared by the tests of this module."""
    from autoshrink.cli import main

    out = tmp_path_factory.mktemp("run") / "digits"
    code = main(["search", "--max-drop", "5", "--n-trials", "6", "--out", str(out), "--quiet",
                 *FAST])
    assert code == 0
    return out


def _study(out):
    return optuna.load_study(study_name="digits-smallcnn", storage=f"sqlite:///{out}/study.db")


def test_search_writes_fronts_and_files(finished):
    for name in ("trials.csv", "pareto-params.csv", "pareto-flops.csv", "pareto-size.csv"):
        assert (finished / name).is_file(), name
    rows = list(csv.DictReader((finished / "trials.csv").open()))
    study = _study(finished)
    assert count_distinct_finished(study) == 6  # complete or aborted early, never more
    baseline_acc = json_baseline(study)["val_accuracy"]
    assert baseline_acc > 0.8  # the baseline really learned digits
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(rows) == len(complete) >= 1
    for trial in complete:
        drop = (baseline_acc - trial.values[0]) * 100
        assert trial.user_attrs["feasible"] == (drop <= 5 + 1e-9)
        assert trial.system_attrs["constraints:accuracy_drop"] == pytest.approx(drop - 5)
        # the same under the key optuna-dashboard 0.21 reads
        assert trial.system_attrs["constraints"] == [pytest.approx(drop - 5)]
        assert (finished / "models" / f"trial-{trial.number}.pt").is_file()


def test_pareto_members_have_test_accuracy(finished):
    rows = list(csv.DictReader((finished / "pareto-params.csv").open()))
    assert rows, "the baseline-equivalent plan at least is feasible"
    assert all(row["test_acc_%"] not in ("", None) for row in rows)
    params = [int(r["nonzero_params"]) for r in rows]
    accuracy = [float(r["val_acc_%"]) for r in rows]
    assert params == sorted(params) and accuracy == sorted(accuracy)  # a real front


def test_search_unfreezes_the_garbage_collector(finished):
    # the search freezes long-lived objects for its trials; a program that goes on after it
    # (a notebook, the test session) must get its collector back
    assert gc.get_freeze_count() == 0


def test_resume_reuses_study_and_baseline(finished, run_cli):
    before = len(_study(finished).trials)
    code, out, err = run_cli("search", "--max-drop", "5", "--n-trials", "6", "--out",
                             str(finished), *FAST)
    assert code == 0, err
    assert len(_study(finished).trials) == before
    assert "baseline epoch" not in err  # cached, not retrained
    assert "already has" in err
    code, out, err = run_cli("search", "--max-drop", "5", "--n-trials", "7", "--out",
                             str(finished), *FAST)
    assert code == 0, err
    assert len(_study(finished).trials) > before


def test_report_at_a_tighter_budget_trains_nothing(finished, run_json):
    loose = run_json("report", "--out", str(finished), "--max-drop", "100")
    tight = run_json("report", "--out", str(finished), "--max-drop", "0")
    assert loose["max_drop"] == 100 and tight["max_drop"] == 0
    assert tight["feasible"] <= loose["feasible"] == loose["trials"]
    for member in tight["fronts"]["params"]["members"]:
        assert member["drop_pp"] <= 0
    assert (finished / "pareto-params.csv").read_text().count("\n") - 1 == len(
        tight["fronts"]["params"]["members"])


def test_report_gives_each_fronts_area_and_what_the_last_trials_added(finished, run_cli,
                                                                        run_json):
    """One number per front that two runs of a task can be compared by, and whether the
    search's last trials still grew it (then more trials may reach further)."""
    payload = run_json("report", "--out", str(finished), "--max-drop", "100")
    front, baseline = payload["fronts"]["params"], payload["baseline"]
    # the staircase under the members, the most accurate first, down to the floor
    floor, area, reach = baseline["val_accuracy"] * 100 - 100, 0.0, 0.0
    members = sorted(front["members"], key=lambda m: -m["val_acc_%"])
    for index, member in enumerate(members):
        reach = max(reach, math.log10(baseline["nonzero_params"] / member["nonzero_params"]))
        lower = members[index + 1]["val_acc_%"] if index + 1 < len(members) else floor
        area += (member["val_acc_%"] - lower) * reach
    assert area > 0 and front["area"] == pytest.approx(area, abs=0.05)
    late = front["late_area_share"]
    assert late["trials"] == math.ceil(payload["trials"] / 4) and 0 <= late["share"] <= 1
    code, out, err = run_cli("report", "--out", str(finished), "--max-drop", "100")
    assert code == 0, err
    assert (f"front area {front['area']:.2f} (pp above the budget's floor x decades of params"
            f" reduction); the last {late['trials']} of {payload['trials']} completed trials"
            f" added {late['share'] * 100:.1f} % of it") in out
    assert "of it added by the last trials" in (finished / "report.html").read_text()


def json_baseline(study):
    import json

    return json.loads(study.user_attrs["baseline"])


def test_user_model_reading_rgb_gets_grey_digits_repeated(tmp_path, run_cli):
    code, _, err = run_cli("search", "--model", "tests.user_models:tiny_rgb_net",
                           "--n-trials", "1", "--epochs", "12", "--out", str(tmp_path),
                           "--techniques", "prune-l1")
    assert code == 0, err
    assert "input 3x8x8" in err


def test_training_length_is_a_fidelity_each_trial_records(tmp_path, run_cli):
    """With several lengths offered, each training trial trains for the share it sampled."""
    out = tmp_path / "run"
    code, _, err = run_cli("search", "--n-trials", "6", "--out", str(out), "--epochs", "12",
                           "--finetune-epochs", "6", "--techniques", "distill", "--sampler",
                           "random", "--training-lengths", "0.5,1", "--n-jobs", "1")
    assert code == 0, err
    trials = _study(out).trials
    trained = [t for t in trials if "training.length" in t.params]
    assert {t.params["training.length"] for t in trained} == {0.5, 1.0}
    for trial in trials:
        if "training.length" not in trial.params:  # the baseline plan: nothing to train
            assert trial.user_attrs["plan_text"] == "baseline"
            continue
        length = trial.params["training.length"]
        # the early-abort monitor records each checked epoch with the epochs planned
        assert {epochs for _, epochs, _ in trial.user_attrs["val_curve"]} == {round(6 * length)}
        assert trial.user_attrs["plan_text"].endswith(" @ 50% epochs") == (length == 0.5)
    # the progress lines say so as well, one per trial that trained for half its run
    halves = sum(t.params.get("training.length") == 0.5 for t in trials)
    assert sum(line.startswith("trial") and " @ 50% epochs" in line
               for line in err.splitlines()) == halves


def test_default_workers_one_per_core_once_each_has_several_trials(monkeypatch):
    monkeypatch.setattr(config_module, "available_cores", lambda: 2)
    assert SearchConfig(n_trials=40).workers == 2  # the default search: 20 trials each
    assert SearchConfig(n_trials=15).workers == 1  # fewer than 8 each: not worth a start-up
    assert SearchConfig(n_trials=5, n_jobs=3).workers == 3  # asked for
    assert SearchConfig(n_trials=1, n_jobs=3).workers == 1  # one trial, one process
    # a confirmation is a full training per candidate: one worker each, up to the cores
    assert SearchConfig(n_trials=1000).confirmation(n_trials=1).workers == 1
    assert SearchConfig(n_trials=1000).confirmation(n_trials=5).workers == 2
    assert SearchConfig(n_trials=1000, n_jobs=1).confirmation(n_trials=5).workers == 1


def test_workers_on_gpus_are_as_many_as_the_gpus_memory_holds(monkeypatch, caplog):
    """Each process on a GPU holds a CUDA context and what its trials allocate; the processes
    take the GPUs in turn, so each GPU must hold its share. A machine without one is not
    asked."""
    import autoshrink.workers as workers

    gib = 2**30
    monkeypatch.setattr(workers.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(workers.torch.cuda, "mem_get_info", lambda: (10 * gib, 24 * gib))
    monkeypatch.setattr(workers.torch.cuda, "max_memory_reserved", lambda: 2 * gib)
    monkeypatch.setattr(workers, "CUDA_CONTEXT_BYTES", gib // 2)
    # 0.5 + 2 x 1.25 = 3 GiB each: GPU 0 holds this process and 3 more, GPU 1 as many
    assert workers.gpu_processes_that_fit(8, 0) == 8
    assert not caplog.records
    assert workers.gpu_processes_that_fit(12, 0) == 8
    assert ("12 processes on 2 GPU(s) would need about 3.0 GiB of GPU memory each and 10.0 GiB"
            " is free on this process's GPU: running 8") in caplog.text
    assert workers.gpu_processes_that_fit(12, 4 * gib) == 4  # at least 0.5 + 4 x 1.25 each
    monkeypatch.setattr(workers.torch.cuda, "is_available", lambda: False)
    assert workers.gpu_processes_that_fit(12, 4 * gib) == 12


def test_workers_take_the_machines_gpus_in_turn(monkeypatch):
    """Every worker trained on the first GPU while the others idled: now each process is given
    one GPU in turn, named as CUDA_VISIBLE_DEVICES names it (the search's own process keeps
    the first), and a machine with one GPU or none changes nothing."""
    import autoshrink.workers as workers

    monkeypatch.setattr(workers.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert workers.gpus_for_workers(6) == ["0", "1", "2", "3", "0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5, GPU-1a2b,7,9,11")  # only 4 of them usable
    assert workers.gpus_for_workers(3) == ["5", "GPU-1a2b", "7"]
    monkeypatch.setattr(workers.torch.cuda, "device_count", lambda: 1)
    assert workers.gpus_for_workers(3) == [None, None, None]
    monkeypatch.setattr(workers.torch.cuda, "is_available", lambda: False)
    assert workers.gpus_for_workers(2) == [None, None]

    seen = []

    class StopsAtOnce:  # the worker's Search: records what CUDA would see, then stops
        def __init__(self, *args, **kwargs):
            seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
            raise KeyboardInterrupt

    monkeypatch.setattr("autoshrink.search.Search", StopsAtOnce)
    monkeypatch.setattr(workers.PluginHost, "discover", lambda **kwargs: None)
    for gpu in ("GPU-1a2b", None):
        with pytest.raises(SystemExit):
            workers._worker_main(SearchConfig(), (), 1, 1, logging.INFO, gpu, None)
    assert seen == ["GPU-1a2b", "GPU-1a2b"]  # None leaves the variable as it was


def test_a_baseline_that_did_not_learn_is_refused_without_keeping_its_study(tmp_path, run_cli,
                                                                            monkeypatch):
    """A learning rate too high leaves the baseline at chance (its ReLUs die; higher still, its
    loss goes to NaN): the search stops with one line instead of reporting every plan "within
    budget" of it, caches nothing, and leaves no study of that recipe in the folder, so the
    same --out runs once the rate is fixed."""
    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(tmp_path / "cache"))
    diverging = tmp_path / "diverging.toml"
    diverging.write_text("[recipe]\nlr = 0.5\n")
    out = tmp_path / "run"
    code, _, err = run_cli("search", "--study", str(diverging), "--n-trials", "1", *FAST,
                           "--out", str(out), "--quiet")
    assert_one_clear_line(code, err, "10.1% validation accuracy")
    assert "lr = 0.5" in err
    assert list((tmp_path / "cache").glob("baselines/*/metrics.json")) == []
    assert optuna.get_all_study_names(f"sqlite:///{out}/study.db") == []
    code, _, err = run_cli("search", "--n-trials", "1", *FAST, "--out", str(out), "--quiet",
                           "--techniques", "prune-l1")
    assert code == 0, err


def test_a_cached_baseline_that_did_not_learn_is_refused(tmp_path, run_cli, monkeypatch):
    """Caches written before the check existed are checked when read."""
    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["search", "--n-trials", "1", *FAST, "--quiet", "--techniques", "prune-l1"]
    code, _, err = run_cli(*argv, "--out", str(tmp_path / "first"))
    assert code == 0, err
    metrics = next((tmp_path / "cache").glob("baselines/*/metrics.json"))
    metrics.write_text(metrics.read_text().replace('"val_accuracy": 0.', '"val_accuracy": 0.0'))
    code, _, err = run_cli(*argv, "--out", str(tmp_path / "second"))
    assert code == 2 and "did not learn" in err, err


def test_a_machine_joining_a_study_judges_its_trials_against_the_studys_baseline(
        tmp_path, run_cli, monkeypatch):
    """Its own baseline (trained on other hardware, so a little off) is only where its trials
    start: their drops, constraints and feasibility are the study's, as every report's are."""
    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["search", "--out", str(tmp_path / "run"), *FAST, "--techniques", "prune-l1"]
    code, _, err = run_cli(*argv, "--n-trials", "1", "--quiet")
    assert code == 0, err
    metrics = next((tmp_path / "cache").glob("baselines/*/metrics.json"))
    this_machine = json.loads(metrics.read_text())
    this_machine["val_accuracy"] -= 0.02
    metrics.write_text(json.dumps(this_machine))
    code, _, err = run_cli(*argv, "--n-trials", "2")
    assert code == 0, err
    study = optuna.load_study(study_name="digits-smallcnn",
                              storage=f"sqlite:///{tmp_path}/run/study.db")
    recorded = json.loads(study.user_attrs["baseline"])["val_accuracy"]
    assert (f"this machine's baseline measured val acc {this_machine['val_accuracy']:.2%},"
            f" the study's {recorded:.2%}") in err
    joined = study.trials[1]
    drop = (recorded - joined.user_attrs["metrics"]["val_accuracy"]) * 100.0
    assert joined.user_attrs["accuracy_drop_pp"] == pytest.approx(drop)
    assert joined.system_attrs["constraints"] == [pytest.approx(drop - 5.0)]
    assert joined.user_attrs["feasible"] == (drop <= 5.0)


@pytest.mark.parametrize("classes,images,passing,refused", [
    (2, 20, [0.80], [0.75, 0.55]),  # a chance of 0.6 % and 2 % for 50 %-right answers
    (3, 20, [0.65], [0.55, 0.35]),  # 3 standard errors asked for 67 %
    (2, 6, [5 / 6, 1.0], [4 / 6]),  # no score has a 1 % chance: above halfway, 75 %, passes
])
def test_a_small_validation_split_judges_learning_by_its_chance(classes, images, passing,
                                                                 refused):
    """A baseline passes when always answering the most common class would score as well less
    than 1 % of the time, or above halfway from that class's share to perfect."""
    import torch

    from autoshrink.recipe import Recipe
    from autoshrink.task import check_learned

    labels = torch.arange(images) % classes
    task = SimpleNamespace(splits=SimpleNamespace(val=SimpleNamespace(y=labels)),
                           recipe=Recipe(), model_spec=SimpleNamespace(name="net"),
                           dataset="tiny")
    for accuracy in passing:
        check_learned(task, accuracy)
    for accuracy in refused:
        with pytest.raises(BaselineDidNotLearn, match=f"{accuracy:.1%} validation accuracy"):
            check_learned(task, accuracy)


def test_a_baseline_whose_loss_diverged_names_the_learning_rate(tmp_path, run_cli):
    diverging = tmp_path / "diverging.toml"
    diverging.write_text("[recipe]\nlr = 1000.0\n")
    code, _, err = run_cli("search", "--study", str(diverging), *FAST, "--out",
                           str(tmp_path / "run"), "--quiet")
    assert code == 2 and "loss is nan" in err and "lr = 1000" in err, err


def test_a_search_stopped_by_its_time_limit_says_how_to_go_on(tmp_path, run_cli):
    argv = ["search", "--n-trials", "5", "--n-jobs", "1", *FAST, "--techniques", "prune-l1",
            "--out", str(tmp_path / "run")]
    code, _, err = run_cli(*argv, "--timeout", "0.01")  # checked between trials: one runs
    assert code == 0, err
    assert ("stopped at the time limit (--timeout 0.01 s) with 1 of 5 trials; re-run the same"
            " command to run the other 4") in err
    code, _, err = run_cli(*argv)
    assert code == 0 and "time limit" not in err, err
    assert count_distinct_finished(_study(tmp_path / "run")) == 5


def test_a_search_that_ran_out_of_plans_under_a_time_limit_does_not_blame_it(tmp_path, run_cli):
    """no-fc alone has a handful of distinct plans (with the training lengths), far fewer than
    30: the search stops on repeats, long before an hour, and must say that, not the limit."""
    code, _, err = run_cli("search", "--n-trials", "30", "--n-jobs", "1", *FAST,
                           "--techniques", "no-fc", "--out", str(tmp_path / "run"),
                           "--timeout", "3600")
    assert code == 0, err
    assert "the search space is exhausted" in err
    assert "time limit" not in err, err


@pytest.mark.parametrize("accuracy, images, budget, expected", [
    (0.979, 288, 5, None),  # digits at the default budget: two standard errors are 1.7 pp
    (0.979, 288, 1, "the 288 validation images measure accuracy to about 0.8 pp (one image"
                    " is 0.35 pp), coarse for a 1 pp budget"),
    (0.90, 20, 5, "the 20 validation images measure accuracy to about 6.7 pp (one image is"
                  " 5.00 pp)"),
    (1.0, 20, 5, "about 4.9 pp (one image is 5.00 pp)"),  # read "about 0.0 pp" at 100 %
])
def test_a_budget_finer_than_the_validation_split_measures_is_warned_of(accuracy, images,
                                                                        budget, expected):
    from autoshrink.task import coarse_budget_warning

    warning = coarse_budget_warning(accuracy, images, budget)
    assert warning == expected if expected is None else expected in warning


@pytest.mark.parametrize("baseline, trial, images, budget, warned", [
    (0.4583, 0.7292, 288, 5, True),  # --epochs 4 on digits: a trial 27 pp above the baseline
    (0.969, 1.0, 288, 5, False),  # a well-trained digits baseline leaves no 5 pp to beat
    (0.90, 0.93, 288, 1, False),  # 3 pp above: within three standard errors (5.3 pp), luck
    (0.90, 0.93, 10_000, 1, True),  # the same on 10,000 images is 10 standard errors
    (0.90, 0.91, 10_000, 2, False),  # beaten, but by less than the budget
])
def test_a_baseline_its_trials_beat_by_more_than_the_budget_is_called_undertrained(
        baseline, trial, images, budget, warned):
    from autoshrink.task import weak_baseline_warning

    warning = weak_baseline_warning(baseline, trial, 7, images, budget, epochs=4)
    assert (warning is not None) == warned
    if warned:
        assert warning.startswith(f"trial 7 scored {(trial - baseline) * 100:.1f} pp above")
        assert "the baseline looks undertrained (4 epochs)" in warning


def test_search_and_report_say_once_that_the_baseline_looks_undertrained(tmp_path, run_cli):
    """Four epochs leave the digits baseline near 46 %, and a distilled copy trained eight more
    epochs from its weights scores far above it: every plan would pass a 5 pp budget."""
    out = str(tmp_path / "run")
    code, _, err = run_cli("search", "--epochs", "4", "--finetune-epochs", "8",
                           "--training-lengths", "1", "--techniques", "distill", "--n-trials",
                           "1", "--out", out)
    assert code == 0, err
    assert err.count("above the baseline") == 1, err
    assert "the baseline looks undertrained (4 epochs)" in err
    code, _, err = run_cli("report", "--out", out)
    assert code == 0, err
    assert err.count("the baseline looks undertrained (4 epochs)") == 1, err


def test_options_held_for_a_technique_the_search_leaves_out_are_warned_of(tmp_path, run_cli):
    """They did nothing, without a word (a preset's [options.distill] under --exclude distill)."""
    code, _, err = run_cli("search", *FAST, "--n-trials", "1", "--techniques", "prune-l1",
                           "--set", "ghost:ratio=4", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert err.count("has no effect") == 1
    assert ("--set ghost:ratio=4 has no effect: ghost is not searched (excluded by --techniques"
            "/--exclude)") in err
    # the twenty techniques --techniques left out, in one line rather than one each
    left_out = [line for line in err.splitlines() if line.startswith("  not searched (")]
    assert len(left_out) == 1, err
    assert "excluded by --techniques/--exclude): adapnet, dice, " in left_out[0]
    assert "ghost" in left_out[0] and "prune-l1" not in left_out[0]


def test_the_search_warns_once_of_a_budget_its_validation_split_cannot_judge(tmp_path,
                                                                              run_cli):
    code, _, err = run_cli("search", *FAST, "--max-drop", "0.5", "--n-trials", "2", "--n-jobs",
                           "2", "--techniques", "prune-l1", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert err.count("validation images measure accuracy to about") == 1
    assert "coarse for a 0.5 pp budget: trials will pass or miss it by chance" in err


def test_every_process_of_a_study_trains_in_the_precision_the_study_settled(tmp_path):
    """Measured in each process, a --n-jobs worker on a busy machine could settle on another
    precision than its parent's and train its trials so; now the study records it once."""
    from autoshrink.config import build_config
    from autoshrink.plugins import PluginHost
    from autoshrink.search import PRECISION_KEY, Search

    config = build_config(None, {"n_trials": 1, "out": str(tmp_path), "epochs": 12,
                                 "finetune_epochs": 2})
    first = Search(config, PluginHost.discover())
    study = first.prepare()
    assert study.user_attrs[PRECISION_KEY] == "float32"  # seed 000's CNN on 16x16 digits
    assert first.trainer.bfloat16 is False
    study.set_user_attr(PRECISION_KEY, "bfloat16")  # as if settled on a machine where it paid
    joining = Search(config, PluginHost.discover(), worker=1)
    joining.prepare()
    assert joining.trainer.bfloat16 is True
