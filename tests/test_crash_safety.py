"""Real processes: killed searches resume without losing work; workers share one study."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from autoshrink.allocator import allocator_in_use, environment_under_tcmalloc, tcmalloc_library
from autoshrink.config import RUN_FOLDER_MARK, SearchConfig, build_config
from autoshrink.errors import UsageError
from autoshrink.search import (
    Search,
    claim_run_folder,
    count_distinct_finished,
    remove_half_written_models,
)
from autoshrink.storage import is_interrupted, open_storage, recover_dead_local_workers
from tests.conftest import FAST, has_ended
from tests.postgres_server import find_bindir, postgres_server

TRIALS = 5
STUDY = "digits-smallcnn"
# a fresh cache per test: keep its baseline short; every trial trains to the end. A few light
# techniques (ghost trains its rewrite from scratch for a few seconds, the rest fine-tune the
# cached baseline): these tests check the bookkeeping around trials, not what trials find.
QUICK = [*FAST, "--epochs", "4", "--no-early-abort",
         "--techniques", "ghost,prune-l1,prune-filters,quantize-fixed-point"]
TRAINS_NOTHING = {"quantize-fixed-point"}  # of QUICK's techniques: a plan of it alone ends at once


def start_search(out: Path, cache: Path, log: Path, *extra: str,
                 machine: int | None = None) -> subprocess.Popen:
    """A search in its own process; with ``machine``, pinned to one core of its own, as on
    separate machines (two searches that each use every core of one machine run far slower
    than one at a time)."""
    env = dict(os.environ, AUTOSHRINK_CACHE_DIR=str(cache))
    argv = [sys.executable, "-m", "autoshrink.cli", "search", "--n-trials", str(TRIALS),
            "--out", str(out), *QUICK, *extra]
    pin = None
    if machine is not None:
        cores = sorted(os.sched_getaffinity(0))
        core = cores[machine % len(cores)]
        pin = functools.partial(os.sched_setaffinity, 0, {core})
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            preexec_fn=pin)


def wait_for_success(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Fail unless ``process`` exits 0 within ``timeout``; a process still running is killed
    and its log shown, so a slow run fails with what it was doing."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"still running after {timeout} s:\n{log.read_text()}") from None
    assert process.returncode == 0, log.read_text()


def read_study_db(db: Path, query: str) -> list[tuple]:
    """Rows of ``query`` on the study's SQLite file, read-only; none while it cannot be read."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute(query).fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or a writer holds the lock
        return []


def trial_states(db: Path) -> dict[int, str]:
    return dict(read_study_db(db, "SELECT number, state FROM trials"))


def planned_running(db: Path) -> dict[int, int]:
    """RUNNING trials that have recorded their plan (which they do just before training) and
    whose plan trains, each with the pid of the process running it; one read, so both come from
    the same state. A plan of ``TRAINS_NOTHING`` alone ends within a fraction of a second,
    before a signal meant for the middle of a trial arrives."""
    rows = read_study_db(
        db, "SELECT t.number, w.value_json, p.value_json FROM trials t"
            " JOIN trial_user_attributes w ON w.trial_id = t.trial_id AND w.key = 'worker'"
            " JOIN trial_user_attributes p ON p.trial_id = t.trial_id AND p.key = 'plan'"
            " WHERE t.state = 'RUNNING'")
    return {number: json.loads(worker)["pid"] for number, worker, plan in rows
            if {name for name, _ in json.loads(json.loads(plan))} - TRAINS_NOTHING}


def kill_mid_trial(process: subprocess.Popen, db: Path, completed_at_least: int) -> int | None:
    """SIGKILL ``process`` while it runs a trial, once enough trials have completed; returns
    the number of the trial it left RUNNING (None: the trial ended just before the kill).

    The kill waits for a trial that has recorded its plan, so it lands in training, the case
    this is about. (A kill the moment a queued trial is taken could land between its two writes,
    state then worker: the one window the storage leaves, see WorkerRecordingStorage.)"""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, "the search ended before it could be killed"
        states = trial_states(db)
        if (sum(s == "COMPLETE" for s in states.values()) >= completed_at_least
                and planned_running(db)):
            process.send_signal(signal.SIGKILL)
            process.wait()
            running = [n for n, s in trial_states(db).items() if s == "RUNNING"]
            return running[0] if running else None
        time.sleep(0.05)
    raise AssertionError("no trial started in time")


def prune_l1_config(out: Path, n_trials: int) -> SearchConfig:
    """A search of prune-l1 alone on a short recipe, run in this process."""
    return build_config(None, {"n_trials": n_trials, "out": str(out), "epochs": 12,
                               "finetune_epochs": 1, "techniques": ("prune-l1",)})


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
    # as if the last kill had come while the trial's model was being saved
    (out / "models" / f".trial-{killed[-1]}.pt.4194305.partial").write_bytes(b"\0" * 4096)
    final = start_search(out, cache, tmp_path / "final.log")
    wait_for_success(final, tmp_path / "final.log")

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
    assert "was interrupted (its worker stopped)" in logs[1] + logs[2] + final_log
    reasons = (out / "stopped.csv").read_text()
    for number in killed:
        assert f"{number},".join(("\n", "")) in reasons
    assert "interrupted: its worker stopped; queued again as trial" in reasons
    # a half-written artifact never takes a trial's name, and the resume removed them
    assert not [p.name for p in (out / "models").iterdir() if p.name.endswith(".partial")]


def test_a_resume_removes_half_written_models_of_trials_that_no_longer_run(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.tell(study.ask(), [0.9, 10.0])
    study.ask()  # trial 1 runs, on another machine sharing the folder
    models = tmp_path / "models"
    models.mkdir()
    names = [".trial-0.pt.123.partial", ".trial-1.pt.456.partial", "trial-0.pt", "notes.partial"]
    for name in names:
        (models / name).write_bytes(b"x")
    remove_half_written_models(study, models)
    assert sorted(p.name for p in models.iterdir()) == sorted(names[1:])


def test_two_processes_share_one_study_and_one_baseline(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    workers = [start_search(out, cache, tmp_path / f"w{i}.log", machine=i) for i in range(2)]
    for index, worker in enumerate(workers):
        wait_for_success(worker, tmp_path / f"w{index}.log")
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert sum("baseline epoch" in text for text in logs) == 1  # one trained, one waited
    study = load(out)
    assert count_distinct_finished(study) == TRIALS
    assert len({t.number for t in study.trials}) == len(study.trials)
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials if "worker" in t.user_attrs}
    assert len(pids) == 2  # both took part


@pytest.mark.parametrize("attempt", range(5))
def test_of_searches_started_at_once_into_one_folder_one_study_claims_it(tmp_path, attempt):
    """Each of several studies reading the folder's mark before any had written it used to
    claim the folder, so their model files overwrote each other's."""
    names = [f"study{i}" for i in range(8)]
    start, refused = threading.Barrier(len(names)), []

    def claim(name: str) -> None:
        config = build_config(None, {"out": str(tmp_path / "run"), "study_name": name})
        start.wait()
        try:
            claim_run_folder(config)
        except UsageError as error:
            refused.append(str(error))

    threads = [threading.Thread(target=claim, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    owner = (tmp_path / "run" / RUN_FOLDER_MARK).read_text().strip()
    assert len(refused) == len(names) - 1
    assert all(f"already holds study {owner!r}" in message for message in refused)


def test_a_run_folder_mark_left_empty_claims_nothing(tmp_path):
    """A process killed between creating the mark and writing its study's name."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / RUN_FOLDER_MARK).touch()
    claim_run_folder(build_config(None, {"out": str(folder), "study_name": "mine"}))
    assert (folder / RUN_FOLDER_MARK).read_text() == "mine\n"


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it, from the parent ids in /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= found
        grew = bool(found)
    return tree


def listening_sockets(pids: set[int]) -> list[str]:
    """TCP sockets in LISTEN state and bound UDP sockets owned by ``pids``."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and (fields[3] == "0A" or table.startswith("udp")):
                found.append(f"{table} {fields[1]}")
    return found


def test_n_jobs_runs_trials_here_and_in_worker_processes_and_listens_on_no_port(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    # twice the usual trials: a worker that is slow to import torch on a busy machine could
    # otherwise find the few quick trials all taken
    trials = 2 * TRIALS
    search = start_search(out, cache, tmp_path / "log", "--n-jobs", "3", "--n-trials",
                          str(trials))
    largest_tree, listening = 0, []
    while search.poll() is None:
        tree = process_tree(search.pid)
        largest_tree = max(largest_tree, len(tree))
        listening += listening_sockets(tree)
        time.sleep(0.5)
    assert search.returncode == 0, (tmp_path / "log").read_text()
    assert largest_tree >= 3  # the search and two workers beside it were watched
    assert listening == []
    log = (tmp_path / "log").read_text()
    # both workers started (the tree above), but on two busy cores the third process may still
    # be importing torch when the other two have taken every trial: one worker must have run
    assert "[worker 1] trial" in log or "[worker 2] trial" in log
    assert "[worker 3]" not in log  # the third of --n-jobs 3 is the search's own process
    # a worker forked from the search logs through it alone, not also through the handler it
    # inherited (autoshrink.standby)
    lines = log.splitlines()
    from_workers = [line.split("] ", 1)[1] for line in lines if line.startswith("[worker ")]
    assert from_workers and not set(from_workers) & set(lines)
    cores = len(os.sched_getaffinity(0))  # the search's, which it inherited
    assert (f"more processes than the {cores} core(s), so they take turns" in log) == (cores < 3)
    study = load(out)
    assert count_distinct_finished(study) == trials
    workers = [t.user_attrs["worker"] for t in study.trials if "worker" in t.user_attrs]
    assert search.pid in {w["pid"] for w in workers} and len({w["pid"] for w in workers}) >= 2
    # the search restarted itself under tcmalloc where it is installed, and its workers
    # inherited it (autoshrink.allocator)
    assert {w["allocator"] for w in workers} == {expected_allocator()}
    finished = [t for t in study.trials if t.state.is_finished()]
    assert all((out / "models" / f"trial-{t.number}.pt").is_file() for t in finished
               if t.state == optuna.trial.TrialState.COMPLETE)


def expected_allocator() -> str:
    """The memory allocator a search started from these tests runs under."""
    restarts = environment_under_tcmalloc(os.environ, tcmalloc_library()) is not None
    return "tcmalloc" if restarts or allocator_in_use() == "tcmalloc" else "system"


def planned_trial_of_another_process(db: Path, pid: int) -> tuple[int, int] | None:
    """(trial number, worker pid) of a RUNNING trial with its plan, run by a process not ``pid``."""
    return next(((number, worker) for number, worker in planned_running(db).items()
                 if worker != pid), None)


def search_with_a_worker_training(tmp_path: Path,
                                  trials: int) -> tuple[subprocess.Popen, Path, int, int]:
    """A ``--n-jobs 2`` search in ``tmp_path`` once its worker process trains a trial: the
    search, its log, and that trial's number and worker pid."""
    out, log = tmp_path / "run", tmp_path / "log"
    search = start_search(out, tmp_path / "cache", log, "--n-jobs", "2", "--n-trials",
                          str(trials))
    deadline, found = time.monotonic() + 240, None
    while found is None and time.monotonic() < deadline:
        assert search.poll() is None, f"the search ended before its worker ran a trial:\n" \
                                      f"{log.read_text()}"
        found = planned_trial_of_another_process(out / "study.db", search.pid)
        time.sleep(0.05)
    assert found is not None, "the worker process ran no trial in time"
    return search, log, *found


def test_a_worker_process_killed_mid_trial_leaves_its_trial_to_the_search(tmp_path):
    """The search's own process fails the dead worker's trial at once and runs its plan again,
    so the study completes in the same run (the heartbeat alone would come a minute later,
    after these few trials have ended with the dead trial still holding its place)."""
    trials = 2 * TRIALS  # the worker imports torch for seconds before its first trial
    search, log, killed, worker_pid = search_with_a_worker_training(tmp_path, trials)
    os.kill(worker_pid, signal.SIGKILL)
    wait_for_success(search, log)

    study = load(tmp_path / "run")
    assert is_interrupted(study.trials[killed])
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert count_distinct_finished(study) == trials
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    text = log.read_text()
    assert f"trial {killed} was interrupted (its worker stopped)" in text
    assert ("autoshrink-worker-1 stopped early (exit code -9, killed by SIGKILL: the system may"
            " have run out of memory") in text
    assert text.count("trials done, running up to") == 1  # the worker does not repeat it


@pytest.mark.skipif(find_bindir() is None, reason="PostgreSQL is not installed (.ci/run does)")
def test_workers_on_two_machines_share_a_postgresql_study(tmp_path):
    """Two workers with their own run folders (as on two machines) and one PostgreSQL study."""
    cache = tmp_path / "cache"
    with postgres_server() as url:
        flags = ("--storage", url, "--study-name", "shared")
        workers = [start_search(tmp_path / f"machine-{i}", cache, tmp_path / f"w{i}.log", *flags,
                                machine=i) for i in range(2)]
        for index, worker in enumerate(workers):
            wait_for_success(worker, tmp_path / f"w{index}.log")
        study = optuna.load_study(study_name="shared", storage=url)
        assert count_distinct_finished(study) == TRIALS
        numbers = [t.number for t in study.trials]
        assert len(numbers) == len(set(numbers))
        pids = {t.user_attrs["worker"]["pid"] for t in study.trials if "worker" in t.user_attrs}
        assert len(pids) == 2
        # the same command and seed on both: each trial is sampled with a seed of its own
        sampled = [json.dumps(t.params, sort_keys=True) for t in study.trials
                   if t.params and "duplicate_of" not in t.user_attrs]
        assert len(sampled) == len(set(sampled)) >= TRIALS - 1
        logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
        assert sum("baseline epoch" in text for text in logs) == 1
        for index in range(2):  # each machine holds the model files of its own trials only
            models = tmp_path / f"machine-{index}" / "models"
            mine = [t for t in study.trials if t.user_attrs.get("worker", {}).get("pid")
                    == workers[index].pid and t.state == optuna.trial.TrialState.COMPLETE]
            files = {int(p.stem.split("-")[1]) for p in models.glob("trial-*.pt")}
            assert files <= {t.number for t in mine}
            assert {t.number for t in mine if "duplicate_of" not in t.user_attrs} <= files


TAKE_A_TRIAL_AND_DIE = """
import os, signal, sys
import optuna
from autoshrink.storage import open_storage
optuna.load_study(study_name="taken", storage=open_storage(sys.argv[1])).ask()
os.kill(os.getpid(), signal.SIGKILL)
"""


QUEUED = {"x": 1.0}


def trials_of_workers_killed_as_they_took_them(tmp_path: Path) -> optuna.Study:
    """A study whose trials 0 (queued, the way a retry is) and 1 (new) were each taken by a
    process killed right after Optuna gave it the trial, before its own heartbeat thread or
    any objective code ran."""
    url = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="taken", storage=open_storage(url))
    study.add_trial(optuna.create_trial(
        state=optuna.trial.TrialState.WAITING, params=QUEUED,
        distributions={"x": optuna.distributions.FloatDistribution(0.0, 2.0)}))
    for _ in range(2):
        died = subprocess.run([sys.executable, "-c", TAKE_A_TRIAL_AND_DIE, url],
                              capture_output=True, text=True)
        assert died.returncode == -signal.SIGKILL, died.stderr
    taken = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert [t.number for t in taken] == [0, 1]
    return study


def assert_failed_and_queued_again(study: optuna.Study) -> None:
    assert all(is_interrupted(study.trials[n]) for n in (0, 1))
    retries = {t.system_attrs["failed_trial"]: t for t in study.trials[2:]}
    assert sorted(retries) == [0, 1]
    assert retries[0].params == QUEUED and retries[1].params == {}
    assert all(t.state == optuna.trial.TrialState.WAITING for t in retries.values())


def test_a_worker_killed_as_it_takes_a_trial_is_found_dead_here_at_once(tmp_path):
    """The trial names its worker, so the next search here fails it and queues it again."""
    study = trials_of_workers_killed_as_they_took_them(tmp_path)
    assert {t.user_attrs["worker"]["host"] for t in study.trials} == {os.uname().nodename}
    assert sorted(recover_dead_local_workers(study)) == [(0, True), (1, True)]
    assert_failed_and_queued_again(study)


def test_a_worker_killed_as_it_takes_a_trial_goes_stale_anywhere(tmp_path, monkeypatch):
    """Seen from another machine, where its process cannot be looked up, the trial goes stale
    by its heartbeat: the first beat is recorded as the trial is taken, not when Optuna's
    heartbeat thread starts after sampling (a trial without a beat would never go stale)."""
    import autoshrink.storage

    study = trials_of_workers_killed_as_they_took_them(tmp_path)
    monkeypatch.setattr(autoshrink.storage, "GRACE_SECONDS", 1)
    elsewhere = optuna.load_study(study_name="taken",
                                  storage=open_storage(f"sqlite:///{tmp_path}/study.db"))
    time.sleep(2.5)  # SQLite's clock counts whole seconds
    optuna.storages.fail_stale_trials(elsewhere)
    assert_failed_and_queued_again(study)


def trial_of_another_machine(study: optuna.Study, distributions=None) -> optuna.Trial:
    """A RUNNING trial whose worker is on another machine: only its heartbeat can end it."""
    trial = study.ask(distributions or {"x": optuna.distributions.FloatDistribution(0.0, 2.0)})
    trial.set_user_attr("worker", {"host": "another-machine", "pid": 1, "started": None})
    study._storage.record_heartbeat(trial._trial_id)
    return trial


def test_heartbeat_fails_and_requeues_a_remote_workers_stale_trial(tmp_path, host,
                                                                   monkeypatch):
    """A worker on another machine stopped beating: the next trial start here takes over."""
    import autoshrink.storage
    from autoshrink.search import open_study
    from autoshrink.task import load_task

    monkeypatch.setattr(autoshrink.storage, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(autoshrink.storage, "GRACE_SECONDS", 1)
    config = prune_l1_config(tmp_path, n_trials=2)
    study, _ = open_study(config, load_task(config, host))
    orphan = trial_of_another_machine(
        study, {"use.prune-l1": optuna.distributions.CategoricalDistribution([False, True])})
    time.sleep(2.5)
    study = Search(config, host).run()
    stale = study.trials[orphan.number]
    assert is_interrupted(stale)
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retries) == 1 and stale.params.items() <= retries[0].params.items()
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    assert count_distinct_finished(study) == 2


def test_a_search_waits_for_the_trials_running_elsewhere_as_it_ends(tmp_path, monkeypatch,
                                                                    caplog):
    """Its report (and a proxy search's choice of candidates) then holds them; a trial
    another machine starts later is not waited for (it may have more trials to run)."""
    import autoshrink.storage

    monkeypatch.setattr(autoshrink.storage, "ELSEWHERE_POLL_SECONDS", 0.02)
    study = optuna.create_study(study_name="shared",
                                storage=open_storage(f"sqlite:///{tmp_path}/study.db"))
    elsewhere = trial_of_another_machine(study)
    ends = [threading.Timer(0.2, trial_of_another_machine, (study,)),
            threading.Timer(0.5, study.tell, (elsewhere, 1.0)),
            threading.Timer(3.0, lambda: study.tell(1, 1.0))]  # the later one, not waited for
    for timer in ends:
        timer.start()
    with caplog.at_level(logging.INFO, logger="autoshrink"):
        assert autoshrink.storage.wait_for_trials_elsewhere(study) == []
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    for timer in ends:
        timer.join()
    assert caplog.text.count("waiting for trial(s) 0, running elsewhere") == 1


def test_a_trial_elsewhere_that_stops_beating_while_waited_for_is_queued_again(tmp_path,
                                                                              monkeypatch):
    import autoshrink.storage

    monkeypatch.setattr(autoshrink.storage, "ELSEWHERE_POLL_SECONDS", 0.1)
    monkeypatch.setattr(autoshrink.storage, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(autoshrink.storage, "GRACE_SECONDS", 1)
    study = optuna.create_study(study_name="shared",
                                storage=open_storage(f"sqlite:///{tmp_path}/study.db"))
    stopped = trial_of_another_machine(study)
    assert autoshrink.storage.wait_for_trials_elsewhere(study) == [(stopped.number, True)]
    assert is_interrupted(study.trials[0])
    assert study.trials[1].state == optuna.trial.TrialState.WAITING
    assert study.trials[1].system_attrs["failed_trial"] == stopped.number


def test_a_trial_stopped_by_ctrl_c_is_queued_again_on_resume(tmp_path, host, caplog):
    from autoshrink.search import open_study
    from autoshrink.task import load_task

    config = prune_l1_config(tmp_path, n_trials=1)
    study, _ = open_study(config, load_task(config, host))
    stopped = study.ask()
    stopped.suggest_categorical("use.prune-l1", [False, True])
    study.tell(stopped, state=optuna.trial.TrialState.FAIL)  # what Optuna records on Ctrl-C
    caplog.set_level(logging.INFO, logger="autoshrink")
    study = Search(config, host).run()
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == stopped.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert stopped.params.items() <= retries[0].params.items()
    assert f"trial {stopped.number} was interrupted" in caplog.text


class SignalledOnExit(contextlib.AbstractContextManager):
    """Optuna's heartbeat thread, but Ctrl-C arrives as it is stopped, after the objective
    returned and before Optuna records the result."""

    def __init__(self, heartbeat):
        self.heartbeat = heartbeat

    def __enter__(self):
        return self.heartbeat.__enter__()

    def __exit__(self, *exc_info):
        os.kill(os.getpid(), signal.SIGINT)
        return self.heartbeat.__exit__(*exc_info)


@pytest.mark.usefixtures("ctrl_c")
@pytest.mark.parametrize("where", ["_tell_with_warning", "get_heartbeat_thread"],
                         ids=["while-recording", "before-recording"])
def test_ctrl_c_between_a_trials_end_and_its_record_stops_the_search_after_the_record(
        tmp_path, host, monkeypatch, where):
    """A signal landing in Optuna's bookkeeping after a trial (every short trial opens that
    window) left the trial RUNNING and its heartbeat thread beating, so the process never
    exited, or made Optuna fail in its own clean-up. It is now held until the trial is
    recorded: the search stops with the trial complete, and the next run runs only the rest."""
    config = prune_l1_config(tmp_path, n_trials=2)
    original = getattr(optuna.study._optimize, where)

    def signalled_while_recording(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    stand_in = {"_tell_with_warning": signalled_while_recording,
                "get_heartbeat_thread": lambda *args: SignalledOnExit(original(*args))}[where]
    threads = threading.active_count()
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(optuna.study._optimize, where, stand_in)
        Search(config, host).run()
    assert threading.active_count() == threads  # no heartbeat thread left beating
    stopped = load(tmp_path)
    assert [t.state for t in stopped.trials] == [optuna.trial.TrialState.COMPLETE]
    resumed = Search(config, host).run()
    assert [t.state for t in resumed.trials] == [optuna.trial.TrialState.COMPLETE] * 2


@pytest.mark.usefixtures("ctrl_c")
def test_ctrl_c_while_a_trial_reads_the_study_stops_it_when_its_training_starts(
        tmp_path, host, monkeypatch):
    """Cutting a read of a SQLite study short left the read's statement open, and Optuna's
    write recording the interrupted trial then failed at once ("database is locked") if a
    worker was writing too. The read now finishes, and the interrupt stops the trial as its
    training starts, recorded as interrupted with its plan."""
    config = prune_l1_config(tmp_path, n_trials=2)
    read, reads_finished = Search._same_params, []

    def signalled_while_reading(search, trial):
        os.kill(os.getpid(), signal.SIGINT)
        found = read(search, trial)
        reads_finished.append(trial.number)
        return found

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Search, "_same_params", signalled_while_reading)
        Search(config, host).run()
    assert reads_finished == [0]
    [stopped] = load(tmp_path).trials
    assert is_interrupted(stopped) and "plan" in stopped.user_attrs


def test_a_plan_that_kills_its_worker_every_time_is_given_up_and_reported(tmp_path):
    """After MAX_RETRIES retries the plan is recorded as one failed trial with the reason:
    it fills its place, is not queued at the next start, and the report says so."""
    from autoshrink.pareto import stopped_from_study
    from autoshrink.storage import MAX_RETRIES, requeue_unretried

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/study.db"))
    found = []
    for run in range(MAX_RETRIES + 1):  # each run of the plan dies with its worker
        trial = study.ask({"fire.squeeze_ratio": optuna.distributions.CategoricalDistribution(
            [4, 8, 16])} if run == 0 else None)
        trial.set_user_attr("plan_text", "fire(squeeze_ratio=16)")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        found += requeue_unretried(study)
    assert found == [(0, True), (1, True), (2, False)]
    assert requeue_unretried(study) == []  # nothing queued at the next start either
    given_up = study.trials[-1]
    assert given_up.state == optuna.trial.TrialState.FAIL and len(study.trials) == 4
    assert given_up.params == study.trials[0].params
    assert "died in all 3 runs of this plan (trials 0, 1, 2)" in given_up.user_attrs["error"]
    assert count_distinct_finished(study) == 1
    reasons = {s.number: s.reason for s in stopped_from_study(study)}
    assert reasons[1] == "interrupted: its worker stopped; queued again as trial 2"
    assert reasons[2] == "interrupted: its worker stopped; given up as trial 3"
    assert reasons[3] == given_up.user_attrs["error"]


def test_a_given_up_plan_sampled_again_fails_at_once(tmp_path, run_cli, monkeypatch):
    """Run again, a plan that killed its worker in every run would most likely kill this
    search too: it fails without training, like a repeat it fills no place, and the search
    completes its trials with other plans. Observer plugins hear of its failure."""
    from autoshrink.plugins import PluginHost

    finished = {}
    monkeypatch.setattr(PluginHost, "notify_trial_finished",
                        lambda host, number, plan, metrics, error: finished.update({number: error}))
    out = tmp_path / "run"
    argv = ["search", "--n-jobs", "1", *FAST, "--techniques", "prune-l1", "--out", str(out),
            "--quiet"]
    assert run_cli(*argv, "--n-trials", "1")[0] == 0
    study = load(out)
    assert study.trials[0].params["use.prune-l1"]  # so the empty plan below is a new one
    fatal = {"use.prune-l1": False}
    study.add_trial(optuna.create_trial(
        state=optuna.trial.TrialState.FAIL, params=fatal, system_attrs={"given_up": True},
        distributions={"use.prune-l1": optuna.distributions.CategoricalDistribution(
            [False, True])}, user_attrs={"error": "its worker process died in all 3 runs"}))
    study.enqueue_trial(fatal)
    code, _, err = run_cli(*argv, "--n-trials", "3")
    assert code == 0, err
    refused = study.trials[2]
    assert refused.params == fatal and refused.state == optuna.trial.TrialState.FAIL
    assert refused.user_attrs["duplicate_of"] == 1
    assert "whose worker died in every run" in refused.user_attrs["error"]
    assert finished[2] == refused.user_attrs["error"]
    assert "timing" not in refused.user_attrs  # recorded only around a trial's evaluation
    assert count_distinct_finished(study) == 3


def test_a_worker_stops_after_its_trial_when_its_search_process_dies(tmp_path):
    """A search killed (or crashed) while its worker trains: the worker finishes that trial
    and stops, instead of running the study to its end unseen; the same command, run again,
    goes on from there."""
    trials = 6 * TRIALS  # far more than the worker can run in the time it is given below
    search, _, _, worker = search_with_a_worker_training(tmp_path, trials)
    search.send_signal(signal.SIGKILL)
    search.wait()
    killed_at = time.monotonic()
    while Path(f"/proc/{worker}").exists() and time.monotonic() < killed_at + 60:
        time.sleep(0.2)
    if Path(f"/proc/{worker}").exists():
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker went on without its search process")
    study = load(tmp_path / "run")
    assert count_distinct_finished(study) < trials
    mine = [t for t in study.trials if t.user_attrs.get("worker", {}).get("pid") == worker]
    assert all(t.state.is_finished() for t in mine)  # its last trial was finished, not dropped


@pytest.mark.parametrize("to_every_process", [False, True], ids=["to-the-search", "to-all"])
def test_sigterm_stops_a_search_and_its_workers_as_ctrl_c_does(tmp_path, to_every_process):
    """``timeout`` and ``docker stop`` send SIGTERM to the search's process alone: it ended at
    once, its trial left RUNNING and its worker training on unseen. Now the worker is told too,
    both record their trials as interrupted (queued again on resume) and the search exits 143
    (128 + SIGTERM) with one line. Slurm sends it to every process: the worker then gets it
    twice (from Slurm and from the search) and must still record its trial."""
    search, log, worker_trial, worker = search_with_a_worker_training(tmp_path, 6 * TRIALS)
    if to_every_process:
        os.kill(worker, signal.SIGTERM)
    search.send_signal(signal.SIGTERM)
    try:
        assert search.wait(timeout=60) == 143, log.read_text()
    finally:
        search.kill()
    assert has_ended(worker)
    assert log.read_text().strip().splitlines()[-1] == (
        "autoshrink: stopped by SIGTERM; finished trials are saved, re-run the same command to"
        " resume")
    study = load(tmp_path / "run")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert is_interrupted(study.trials[worker_trial])


def test_a_search_waits_for_the_study_another_process_is_still_describing(tmp_path, host):
    """Two searches started together: one creates the study and then writes its task and
    settings; the other, finding it created, waits for those and checks against them (it read
    a half-described study and crashed with KeyError 'config' before)."""
    import threading

    from autoshrink.config import build_config
    from autoshrink.errors import UsageError
    from autoshrink.search import describe_study, open_study
    from autoshrink.task import load_task

    config = build_config(None, {"out": str(tmp_path)})
    task = load_task(config, host)
    created = optuna.create_study(
        study_name=config.name, storage=open_storage(config.storage_url),
        directions=["maximize"] + ["minimize"] * len(config.objectives))
    other = build_config(None, {"out": str(tmp_path), "max_drop": 2.0})
    creator = threading.Timer(1.0, describe_study, args=(created, other, task))
    creator.start()
    try:
        with pytest.raises(UsageError, match="created with --max-drop 2"):
            open_study(config, task)
    finally:
        creator.join()


def test_a_study_its_creator_never_described_is_described_by_the_next_search(
        tmp_path, host, monkeypatch, caplog):
    import autoshrink.search
    from autoshrink.config import build_config
    from autoshrink.search import PRECISION_KEY, open_study
    from autoshrink.task import load_task

    monkeypatch.setattr(autoshrink.search, "DESCRIPTION_WAIT_SECONDS", 0.5)
    config = build_config(None, {"out": str(tmp_path)})
    optuna.create_study(study_name=config.name, storage=open_storage(config.storage_url),
                        directions=["maximize"] + ["minimize"] * len(config.objectives))
    study, created = open_study(config, load_task(config, host))
    assert created and study.user_attrs["task"]["model"] == "smallcnn"
    assert study.user_attrs[PRECISION_KEY] == "float32"  # settled with the description
    assert "never described" in caplog.text
    assert open_study(config, load_task(config, host))[1] is False  # now described: resumed


def test_n_jobs_runs_only_as_many_processes_as_the_free_memory_holds(run_cli, tmp_path,
                                                                     monkeypatch, caplog):
    """``--n-jobs 64`` on a 24 GB machine started 63 workers of 0.5 GB each: the system ran out
    of memory and killed the search, whose workers went on unseen. Now the search runs as many
    as the free memory holds (each worker needs about what this process holds) and says so."""
    import autoshrink.standby
    import autoshrink.workers

    monkeypatch.setattr(autoshrink.workers, "available_memory", lambda: 2 * 2**30)
    monkeypatch.setattr(autoshrink.workers, "private_memory", lambda: 2**30)
    assert autoshrink.workers.processes_that_fit(3) == 2  # 1.25 GiB a worker
    # what standby workers hold already is part of their 1.25 GiB, not taken from the free
    assert autoshrink.workers.processes_that_fit(3, held_by_standby=2**30) == 3
    assert autoshrink.workers.processes_that_fit(4, held_by_standby=2**29) == 3
    assert "2.5 GiB is free (with the 0.5 GiB that workers started early hold already)" in (
        caplog.text)
    assert autoshrink.workers.processes_that_fit(1) == 1
    # the whole machine short of memory: no standby worker starts either (whose real memory
    # the count would add to the stub's)
    for module in (autoshrink.workers, autoshrink.standby):
        monkeypatch.setattr(module, "available_memory", lambda: 2**29)
    out = tmp_path / "run"
    code, _, err = run_cli("search", "--n-jobs", "2", "--n-trials", "2", *FAST,
                           "--techniques", "prune-l1", "--out", str(out))
    assert code == 0, err
    assert ("2 processes would need about 2.5 GiB (1.2 GiB each) and 0.5 GiB is free:"
            " running 1; pass a smaller --n-jobs to choose") in err
    assert "running trials in" not in err  # no worker processes
    assert {t.user_attrs["worker"]["pid"] for t in load(out).trials} == {os.getpid()}


def test_n_jobs_starts_no_process_for_which_no_trial_is_left(run_cli, tmp_path):
    """``--n-jobs 64 --n-trials 1`` started 36 workers (as many as the memory held) for one
    trial: they loaded the task and the baseline beside it and found nothing to run, and the
    trial ran five times slower among them. A search now runs no more processes than its study
    has trials left, a resumed one included."""
    out = tmp_path / "run"
    argv = ["search", *FAST, "--techniques", "prune-l1", "--out", str(out)]
    code, _, err = run_cli(*argv, "--n-trials", "2", "--n-jobs", "1")
    assert code == 0, err
    code, _, err = run_cli(*argv, "--n-trials", "3", "--n-jobs", "3")
    assert code == 0, err
    assert "1 trial left to run, so 1 process instead of 3" in err
    assert "running trials in" not in err  # no worker processes
    study = load(out)
    assert count_distinct_finished(study) == 3  # and a plan sampled again, if any, here too
    assert {t.user_attrs["worker"]["pid"] for t in study.trials} == {os.getpid()}
