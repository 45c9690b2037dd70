"""Real processes: killed searches resume without losing work; workers share one study."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from autoshrink.search import count_distinct_finished
from autoshrink.storage import is_interrupted
from tests.conftest import FAST
from tests.postgres_server import find_bindir, postgres_server

TRIALS = 6
STUDY = "digits-smallcnn"


def start_search(out: Path, cache: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, AUTOSHRINK_CACHE_DIR=str(cache))
    argv = [sys.executable, "-m", "autoshrink.cli", "search", "--n-trials", str(TRIALS),
            "--out", str(out), *FAST, *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def trial_states(db: Path) -> dict[int, str]:
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return dict(connection.execute("SELECT number, state FROM trials"))
    except sqlite3.OperationalError:  # tables not created yet, or a writer holds the lock
        return {}


def kill_mid_trial(process: subprocess.Popen, db: Path, completed_at_least: int) -> int | None:
    """SIGKILL ``process`` while it runs a trial, once enough trials have completed; returns
    the number of the trial it left RUNNING (None: the trial ended just before the kill)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, "the search ended before it could be killed"
        states = trial_states(db)
        if ("RUNNING" in states.values()
                and sum(s == "COMPLETE" for s in states.values()) >= completed_at_least):
            time.sleep(0.3)  # inside the trial: training takes seconds
            process.send_signal(signal.SIGKILL)
            process.wait()
            running = [n for n, s in trial_states(db).items() if s == "RUNNING"]
            return running[0] if running else None
        time.sleep(0.05)
    raise AssertionError("no trial started in time")


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out}/study.db")


def test_kill_nine_three_times_then_resume(tmp_path):
    out, cache, db = tmp_path / "run", tmp_path / "cache", tmp_path / "run" / "study.db"
    killed, completed_before_kill, logs = [], [], []
    while len(killed) < 3 and len(logs) < 6:
        logs.append(tmp_path / f"kill-{len(logs)}.log")
        process = start_search(out, cache, logs[-1])
        number = kill_mid_trial(process, db, completed_at_least=len(killed) + 1)
        if number is not None:
            killed.append(number)
            completed_before_kill.append({n for n, s in trial_states(db).items()
                                          if s == "COMPLETE"})
    assert len(killed) == 3
    final = start_search(out, cache, tmp_path / "final.log")
    assert final.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()

    study = load(out)
    by_number = {t.number: t for t in study.trials}
    complete = {n for n, t in by_number.items() if t.state == optuna.trial.TrialState.COMPLETE}
    for before in completed_before_kill:
        assert before <= complete  # nothing completed was lost
    for number in killed:
        assert is_interrupted(by_number[number])  # failed, with no reason of its own
        retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
        assert len(retries) == 1 and retries[0].state != optuna.trial.TrialState.RUNNING
    assert count_distinct_finished(study) == TRIALS  # the study completed
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    logs = [log.read_text() for log in logs]
    final_log = (tmp_path / "final.log").read_text()
    assert "baseline epoch" in logs[0]
    assert all("baseline epoch" not in text for text in (*logs[1:], final_log))
    assert "was interrupted with its worker" in logs[1] + logs[2] + final_log
    reasons = (out / "failures.csv").read_text()
    for number in killed:
        assert f"{number},".join(("\n", "")) in reasons
    assert "interrupted: its worker stopped; queued again as trial" in reasons
    leftovers = [p.name for p in (out / "models").iterdir() if p.name.endswith(".partial")]
    for name in leftovers:  # a half-written artifact never takes a trial's name
        assert name.startswith(".")


def test_two_processes_share_one_study_and_one_baseline(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    workers = [start_search(out, cache, tmp_path / f"w{i}.log") for i in range(2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert sum("baseline epoch" in text for text in logs) == 1  # one trained, one waited
    study = load(out)
    assert count_distinct_finished(study) == TRIALS
    assert len({t.number for t in study.trials}) == len(study.trials)
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials if "worker" in t.user_attrs}
    assert len(pids) == 2  # both took part


def test_n_jobs_runs_worker_processes(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    search = start_search(out, cache, tmp_path / "log", "--n-jobs", "2")
    assert search.wait(timeout=300) == 0, (tmp_path / "log").read_text()
    log = (tmp_path / "log").read_text()
    assert "[worker 1] trial" in log and "[worker 2] trial" in log
    study = load(out)
    assert count_distinct_finished(study) == TRIALS
    finished = [t for t in study.trials if t.state.is_finished()]
    assert all((out / "models" / f"trial-{t.number}.pt").is_file() for t in finished
               if t.state == optuna.trial.TrialState.COMPLETE)


@pytest.mark.skipif(find_bindir() is None, reason="PostgreSQL is not installed (.ci/run does)")
def test_workers_on_two_machines_share_a_postgresql_study(tmp_path):
    """Two workers with their own run folders (as on two machines) and one PostgreSQL study."""
    cache = tmp_path / "cache"
    with postgres_server() as url:
        flags = ("--storage", url, "--study-name", "shared")
        workers = [start_search(tmp_path / f"machine-{i}", cache, tmp_path / f"w{i}.log", *flags)
                   for i in range(2)]
        for worker in workers:
            assert worker.wait(timeout=300) == 0
        study = optuna.load_study(study_name="shared", storage=url)
        assert count_distinct_finished(study) == TRIALS
        numbers = [t.number for t in study.trials]
        assert len(numbers) == len(set(numbers))
        pids = {t.user_attrs["worker"]["pid"] for t in study.trials if "worker" in t.user_attrs}
        assert len(pids) == 2
        logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
        assert sum("baseline epoch" in text for text in logs) == 1
        for index in range(2):  # each machine holds the model files of its own trials only
            models = tmp_path / f"machine-{index}" / "models"
            mine = [t for t in study.trials if t.user_attrs.get("worker", {}).get("pid")
                    == workers[index].pid and t.state == optuna.trial.TrialState.COMPLETE]
            files = {int(p.stem.split("-")[1]) for p in models.glob("trial-*.pt")}
            assert files <= {t.number for t in mine}
            assert {t.number for t in mine if "duplicate_of" not in t.user_attrs} <= files
