"""The arithmetic the benchmark scripts report."""

from __future__ import annotations

import datetime
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from benchmarks.default_search import (
    TORCH_LIBRARY,
    lost_after_training,
    overhead,
    process_memory_mb,
    processes_mapping,
    tree_memory_mb,
)


def test_engine_overhead_counts_the_time_between_trials():
    # two trials 10 s long with 1 s between them; the measured parts add up to 18 s, so the
    # engine's share is the 3 s left of the 21 s loop, the gap included
    start = datetime.datetime(2026, 1, 1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for begin, parts in ((0, (7.0, 1.0, 0.5, 0.5)), (11, (8.0, 0.5, 0.0, 0.5))):
        training, evaluating, latency, techniques = parts
        timing = {"training": training, "evaluating": evaluating, "latency": latency,
                  "techniques": techniques, "total": 10.0}
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, trial_id=0, state=optuna.trial.TrialState.COMPLETE, value=None,
            values=[0.9, 100.0], datetime_start=start + datetime.timedelta(seconds=begin),
            datetime_complete=start + datetime.timedelta(seconds=begin + 10), params={},
            distributions={}, user_attrs={"timing": timing}, system_attrs={},
            intermediate_values={}))
    shares = overhead(study)
    assert shares["total"] == pytest.approx(21.0)
    assert shares["training"] == pytest.approx(15.0)
    assert shares["engine"] == pytest.approx(3.0)


def test_engine_overhead_adds_up_each_worker_loop():
    # two workers side by side over the same 10 s: 20 s of trial loops, 2 s of it the engine's
    start = datetime.datetime(2026, 1, 1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for pid in (101, 102):
        timing = {"training": 8.0, "evaluating": 1.0, "latency": 0.0, "techniques": 0.0,
                  "total": 10.0}
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, trial_id=0, state=optuna.trial.TrialState.COMPLETE, value=None,
            values=[0.9, 100.0], datetime_start=start,
            datetime_complete=start + datetime.timedelta(seconds=10), params={},
            distributions={}, user_attrs={"timing": timing, "worker": {"pid": pid}},
            system_attrs={}, intermediate_values={}))
    shares = overhead(study)
    assert (shares["workers"], shares["span"]) == (2, pytest.approx(10.0))
    assert shares["total"] == pytest.approx(20.0)
    assert shares["engine"] == pytest.approx(2.0)


def test_start_lag_is_how_late_the_last_process_took_its_first_trial():
    # the search's process runs trials from 0 s on, its worker's first one starts at 6 s
    start = datetime.datetime(2026, 1, 1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for pid, begin in ((101, 0), (101, 4), (102, 6), (102, 9)):
        timing = {"training": 2.0, "evaluating": 0.0, "latency": 0.0, "techniques": 0.0,
                  "total": 3.0}
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, trial_id=0, state=optuna.trial.TrialState.COMPLETE, value=None,
            values=[0.9, 100.0], datetime_start=start + datetime.timedelta(seconds=begin),
            datetime_complete=start + datetime.timedelta(seconds=begin + 3), params={},
            distributions={}, user_attrs={"timing": timing, "worker": {"pid": pid}},
            system_attrs={}, intermediate_values={}))
    assert overhead(study)["start_lag"] == pytest.approx(6.0)


def test_trials_over_budget_are_told_apart_by_their_last_check():
    # floor 0.9: one trial within budget, two below it, of which one was still above the floor
    # at its last check (epoch 9 of 10) and one was already below; a pruned trial counts only
    # in the time of all trials (8 s of 11)
    start = datetime.datetime(2026, 1, 1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for state, final, last_check, seconds in (("COMPLETE", 0.95, 0.96, 2.0),
                                              ("COMPLETE", 0.40, 0.93, 3.0),
                                              ("COMPLETE", 0.85, 0.86, 5.0),
                                              ("PRUNED", None, 0.50, 1.0)):
        attrs = {"timing": {"total": seconds}, "val_curve": [[9, 10, last_check]]}
        if final is not None:
            attrs["metrics"] = {"val_accuracy": final}
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, trial_id=0, state=optuna.trial.TrialState[state], value=None,
            values=None if final is None else [final, 100.0], datetime_start=start,
            datetime_complete=start, params={}, distributions={}, user_attrs=attrs,
            system_attrs={}, intermediate_values={}))
    lost = lost_after_training(study, 0.9)
    assert lost == {"over_budget": 2, "time_share": pytest.approx(8 / 11),
                    "within_at_last_check": 1}


def test_memory_of_a_process_tree_counts_its_children():
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys; x = bytearray(200 << 20);"
                              " subprocess.run([sys.executable, '-c',"
                              " 'import time; y = bytearray(200 << 20); time.sleep(60)'])"],
                             start_new_session=True)
    try:
        def both_allocated(sizes: dict[int, float]) -> bool:
            return len(sizes) == 2 and all(mb > 195 for mb in sizes.values())

        deadline, sizes, total = time.monotonic() + 20, {}, 0.0
        # polled, each read a scan of /proc of its own: under a loaded test run one scan read
        # a single process's 200 MB right after another had read both
        while not (both_allocated(sizes) and total > 390) and time.monotonic() < deadline:
            time.sleep(0.2)  # each process on its own, not their sum: one may still be filling
            sizes, total = process_memory_mb(child.pid), tree_memory_mb(child.pid)
        assert both_allocated(sizes), sizes
        assert total > 390, (total, sizes)  # the tree's total counts both 200 MB
    finally:  # the whole group, grandchild included
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def test_the_memory_benchmark_holds_no_torch_while_the_search_runs():
    # a process mapping torch's libraries takes a share of their pages from the search's
    # proportional set sizes, so the benchmark itself must not import torch before the run
    imported = subprocess.run([sys.executable, "-c", "import sys, benchmarks.default_search;"
                               " print('torch' in sys.modules)"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parents[1])
    assert imported.stdout.strip() == "False"


def test_processes_holding_torch_are_found():
    child = subprocess.Popen([sys.executable, "-c", "import sys, torch; print(flush=True);"
                              " sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # torch imported
        found = processes_mapping(TORCH_LIBRARY)
        assert child.pid in found and os.getpid() not in found
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("script", ["hypervolume", "fashion_mnist_search"])
def test_benchmark_scripts_explain_their_arguments(script, capsys):
    # the recorded runs pass bare numbers; --help must describe them, not fail on parsing
    parse_arguments = importlib.import_module(f"benchmarks.{script}").parse_arguments
    with pytest.raises(SystemExit) as shown:
        parse_arguments(["--help"])
    assert shown.value.code == 0 and "positional arguments" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        parse_arguments(["ten"])
    assert refused.value.code == 2 and "invalid" in capsys.readouterr().err
