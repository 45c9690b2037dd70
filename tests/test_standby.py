"""Worker processes started before the search loads torch (autoshrink.standby)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

import autoshrink.standby
from autoshrink.standby import StandbyWorkers, standby_count, standby_workers
from tests.conftest import FAST, has_ended


def workers_alive() -> list[str]:
    return [p.name for p in multiprocessing.active_children()
            if p.name.startswith("autoshrink-worker")]


@pytest.fixture
def cores(monkeypatch):
    """Set the cores the standby workers are counted against."""
    return lambda count: monkeypatch.setattr(autoshrink.standby, "available_cores",
                                             lambda: count)


def test_standby_workers_leave_a_core_to_the_search_and_fit_in_free_memory(cores, monkeypatch):
    monkeypatch.setattr(autoshrink.standby, "available_memory", lambda: 20 * 2**30)
    cores(2)
    assert standby_count(1) == 1
    assert standby_count(5) == 1  # the others start once the search knows how many fit
    assert standby_count(0) == 0
    cores(1)
    assert standby_count(3) == 0
    cores(16)
    assert standby_count(63) == 15
    monkeypatch.setattr(autoshrink.standby, "available_memory", lambda: 5 * 2**30 // 2)
    assert standby_count(63) == 2  # a gibibyte each
    monkeypatch.setattr(autoshrink.standby, "available_memory", lambda: None)
    assert standby_count(4) == 4


def test_standby_workers_the_block_did_not_take_are_stopped(cores):
    cores(3)
    with standby_workers(2) as standby:
        assert isinstance(standby, StandbyWorkers)
        assert sorted(workers_alive()) == ["autoshrink-worker-1", "autoshrink-worker-2"]
        deadline = time.monotonic() + 60  # they hold ~0.5 MiB each at first, ~450 MiB once
        while standby.held_memory() < 2 * 100 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.1)  # their imports are done (a few seconds)
        assert standby.held_memory() >= 2 * 100 * 2**20
        standby.dismiss()
        assert standby.held_memory() == 0  # none waiting
    assert workers_alive() == []
    with standby_workers(0) as standby:
        assert standby is None
    assert workers_alive() == []


def test_a_search_hands_its_worker_a_process_started_with_the_command(run_cli, tmp_path,
                                                                        cores, monkeypatch):
    """The worker that runs trials beside the search is the one started before the search
    loaded torch, and nothing of the standby outlives the command."""
    cores(2)
    taken = []
    take = StandbyWorkers.take
    monkeypatch.setattr(StandbyWorkers, "take",
                        lambda self, arguments: taken.extend(take(self, arguments)) or taken)
    out = tmp_path / "run"
    code, _, err = run_cli("search", "--n-jobs", "2", "--n-trials", "10", *FAST,
                           "--techniques", "prune-l1", "--out", str(out))
    assert code == 0, err
    assert [p.name for p in taken] == ["autoshrink-worker-1"]
    study = optuna.load_study(study_name="digits-smallcnn", storage=f"sqlite:///{out}/study.db")
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials if "worker" in t.user_attrs}
    assert taken[0].pid in pids and len(pids) == 2
    assert workers_alive() == []


def test_a_search_refused_after_its_workers_started_stops_them_at_once(run_cli, tmp_path,
                                                                      cores, monkeypatch):
    cores(2)
    started = []
    init = StandbyWorkers.__init__
    monkeypatch.setattr(StandbyWorkers, "__init__",
                        lambda self, count, fork: started.append(count) or init(self, count,
                                                                                fork))
    code, _, err = run_cli("search", "--n-jobs", "2", "--model", "no-such-model", "--out",
                           str(tmp_path / "run"))
    assert code == 2
    assert "no-such-model" in err
    assert started == [1]  # the name is checked once the plugins are loaded, after the start
    assert workers_alive() == []
    assert not (tmp_path / "run").exists()


# a search run as a program forks its standby workers once it has imported the libraries
FORKED_STANDBY = """
import os, sys, time
import sklearn.model_selection
import autoshrink.search
from autoshrink.standby import StandbyWorkers

def field(pid, name):
    with open(f"/proc/{pid}/smaps_rollup") as lines:
        return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(name + ":"))

standby = StandbyWorkers(2, fork=True)
pids = [process.pid for process, _ in standby._waiting]
time.sleep(1)
print(*pids, min(field(pid, "Shared_Dirty") for pid in pids), standby.held_memory(), flush=True)
os._exit(0)  # dies without dismissing them, as a search killed by SIGKILL would
"""


def test_forked_standby_workers_share_the_libraries_and_end_with_the_search():
    # (a child that kept the script's output pipe open, unended, would time this out)
    done = subprocess.run([sys.executable, "-c", FORKED_STANDBY], capture_output=True,
                          text=True, timeout=90, check=True)
    *pids, shared, held = map(int, done.stdout.split())
    try:
        assert shared > 200 * 2**20  # torch's and the rest's memory, written once, in common
        assert held < 2 * 50 * 2**20  # what they hold alone (a spawned one: 450 MiB)
        deadline = time.monotonic() + 30
        while not all(has_ended(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        # each closed its copies of the search's ends of the pipes, so it saw end-of-file
        assert all(has_ended(pid) for pid in pids)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_workers_are_forked_only_before_torch_loads_and_away_from_gpu_drivers(monkeypatch):
    assert not autoshrink.standby.can_fork_workers()  # this test process has torch loaded
    monkeypatch.delitem(sys.modules, "torch")
    drivers = set()
    monkeypatch.setattr(autoshrink.standby.os.path, "exists", lambda path: path in drivers)
    assert autoshrink.standby.can_fork_workers() == sys.platform.startswith("linux")
    for driver in ("/proc/driver/nvidia", "/dev/kfd"):
        drivers = {driver}
        assert not autoshrink.standby.can_fork_workers()


SPAWNED_BESIDE_A_THREAD = """
import threading, time
import sklearn.model_selection
import autoshrink.search
from autoshrink.standby import StandbyWorkers

threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # a plugin's, say
standby = StandbyWorkers(1, fork=True)
deadline = time.monotonic() + 60
while standby.held_memory() < 100 * 2**20 and time.monotonic() < deadline:
    time.sleep(0.1)  # a spawned worker's own imports, which a forked one never makes
print(standby.held_memory())
standby.dismiss()
"""


def test_a_process_with_another_thread_spawns_its_workers_instead():
    done = subprocess.run([sys.executable, "-c", SPAWNED_BESIDE_A_THREAD], capture_output=True,
                          text=True, timeout=90, check=True)
    assert int(done.stdout) >= 100 * 2**20
