"""Shared fixtures and helpers: an isolated baseline cache, the plugin registry, process checks."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from autoshrink.cli import main

# A recipe small enough for tests: the baseline still reaches well over 80 % on digits.
FAST = ["--epochs", "12", "--finetune-epochs", "2"]


def pytest_configure(config):
    """Under pytest-xdist (the suite's ``-n``), each worker process keeps one core of its own,
    before anything imports torch: it then trains with one thread, as on a one-core machine,
    instead of each worker running as many threads as the machine has cores on the same cores.
    The ``-n 0`` run of a single test keeps every core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
    if worker is not None:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core this process may run on, counted as autoshrink counts
    them, where pytest-xdist would count the machine's physical cores if psutil is installed."""
    from autoshrink.recipe import available_cores  # settings only: no torch

    return available_cores()


def has_ended(pid: int) -> bool:
    """Gone, or a zombie left for its parent to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """One baseline cache for the whole session, never the user's own (session-scoped, so it is
    in place before module-scoped fixtures run searches)."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOSHRINK_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="session")
def host():
    from autoshrink.plugins import PluginHost  # imports torch: not before pytest_configure

    return PluginHost.discover()


@pytest.fixture
def untrained_baselines(monkeypatch):
    """For tests of plumbing that train a baseline for an epoch or two on a few images: it
    need not have learned, which a search otherwise refuses (autoshrink.task.check_learned)."""
    monkeypatch.setattr("autoshrink.task.check_learned", lambda task, val_accuracy: None)


@pytest.fixture
def ctrl_c():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt within the test, as in a terminal, even where
    the test run inherited it ignored: bash starts a background job (``&``) with SIGINT
    ignored, and Python then keeps it so."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def run_cli(capsys):
    """Run the real command in-process; returns (exit code, stdout, stderr)."""

    def run(*argv: str):
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def run_json(run_cli):
    def run(*argv: str):
        code, out, err = run_cli(*argv, "--json")
        assert code == 0, err
        return json.loads(out)

    return run


@pytest.fixture(scope="session")
def small_study(host, tmp_path_factory):
    """A finished two-trial study: trial 0 prunes filters (float), trial 1 is int8."""
    from autoshrink.config import build_config
    from autoshrink.search import Search, open_study
    from autoshrink.task import load_task

    out = tmp_path_factory.mktemp("small-study")
    config = build_config(None, {"n_trials": 2, "epochs": 12, "finetune_epochs": 1,
                                 "out": str(out), "early_abort": False})
    study, _ = open_study(config, load_task(config, host))
    for plan in ({"prune-filters"}, {"quantize-int8"}):
        study.enqueue_trial({f"use.{n}": n in plan for n in host.techniques},
                            skip_if_exists=False)
    Search(config, host).run()
    return out
