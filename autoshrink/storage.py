"""Where a study lives, and how it survives workers that die in the middle of a trial.

Every study is in an Optuna RDB storage (SQLite in the run folder by default, PostgreSQL or MySQL
for workers on several machines). Two mechanisms find the trials of a dead worker:
- on this machine, at once: each trial records its worker's host, pid and process start time
  as it becomes RUNNING (a new trial in the same write that creates it), so a search starting
  here, and every search process here after each of its trials, fails the RUNNING trials of
  processes that no longer exist, even one killed a moment after it took its trial;
- anywhere, after a grace period: Optuna's heartbeat (a worker that stops beating for
  ``GRACE_SECONDS`` has its trial failed by the next worker that starts a trial); the first beat
  is recorded as the trial is taken, so this holds for a worker killed at any moment after.
Either way the interrupted trial is failed without an ``error`` attribute (that is how the count
of finished trials leaves it out) and queued again with the same parameters, at most
``MAX_RETRIES`` times: a plan that kills its worker every time is then recorded as a failed
trial with that reason, so it cannot stall the study or its resumes.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from autoshrink.allocator import allocator_in_use
from autoshrink.errors import UsageError
from autoshrink.progress import PROGRESS_EVERY_S

HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
ELSEWHERE_POLL_SECONDS = 2.0  # how often a search looks whether other machines' trials ended
MAX_RETRIES = 2
SCHEMA_RACE_ATTEMPTS = 4
SQLITE_LOCK_WAIT_SECONDS = 120  # concurrent local workers queue for the file lock
# the user attributes a trial is queued with, which a run queued again in its place keeps: the
# proxy trial a confirmation re-runs and the plan that trial ended with (autoshrink.confirm), and
# a starting plan's text (autoshrink.start_plans)
PROXY_TRIAL_ATTR = "proxy_trial"
EARLIER_RUN_ATTR = "earlier_run_plan"
START_PLAN_ATTR = "start_plan"
QUEUED_WITH = (PROXY_TRIAL_ATTR, EARLIER_RUN_ATTR, START_PLAN_ATTR)

log = logging.getLogger(__name__)


class WorkerRecordingStorage(optuna.storages.RDBStorage):
    """An RDB storage that records the worker of a trial, and its first heartbeat, as the trial
    becomes RUNNING.

    Recorded later, from the objective, a worker killed in between would leave a RUNNING trial
    that names no process: nothing on this machine could tell it is dead. Optuna's own first
    heartbeat comes after the sampler has chosen the trial's parameters (TPE: tens of
    milliseconds or more), and a trial without one is never stale, so a worker on another
    machine killed before it would hold one of the ``--n-trials`` places for good.
    """

    def _create_new_trial(self, study_id: int,
                          template_trial: FrozenTrial | None = None) -> FrozenTrial:
        # the one place every new trial goes through: Optuna's caching wrapper around a study's
        # storage calls it directly, not the public create_new_trial
        if template_trial is not None:  # a queued trial (taken in set_trial_state_values)
            return super()._create_new_trial(study_id, template_trial)
        trial = super()._create_new_trial(study_id, optuna.create_trial(
            state=TrialState.RUNNING, user_attrs={"worker": this_worker()}))
        self.record_heartbeat(trial._trial_id)
        return trial

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        taken = super().set_trial_state_values(trial_id, state, values)
        if taken and state == TrialState.RUNNING:  # this process took a queued trial
            # more writes, so a kill in the milliseconds between them leaves an owner-less trial;
            # doing them before taking the trial would be worse: a worker that loses the race
            # for it could overwrite the winner's name, or collide with its first heartbeat
            self.record_heartbeat(trial_id)
            self.set_trial_user_attr(trial_id, "worker", this_worker())
        return taken


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; bad URLs, missing drivers and dead servers are UsageError."""
    if url.startswith("sqlite:///"):
        _check_sqlite_folder(url)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_WAIT_SECONDS}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        for attempt in range(SCHEMA_RACE_ATTEMPTS):
            try:
                return WorkerRecordingStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=retry_interrupted)
            except sqlalchemy.exc.DBAPIError as error:
                # workers starting together on an empty database race to create its tables
                # (PostgreSQL: unique violation; SQLite: "table ... already exists")
                racing = isinstance(error, (sqlalchemy.exc.IntegrityError,
                                            sqlalchemy.exc.ProgrammingError)) \
                    or "already exists" in str(error)
                if not racing or attempt == SCHEMA_RACE_ATTEMPTS - 1:
                    raise
                time.sleep(1.0 + attempt)
    except ImportError as error:  # optuna re-raises the driver's ModuleNotFoundError
        missing = getattr(error.__cause__, "name", None) or getattr(error, "name", None)
        raise UsageError(f"storage {url!r} needs the Python database driver {missing!r};"
                         " install it (for PostgreSQL: pip install 'autoshrink[postgres]')"
                         ) from None
    except Exception as error:  # SQLAlchemy raises several types for unusable URLs
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot open storage {url!r} ({reason}); pass a writable"
                         " sqlite:///path.db or a reachable postgresql://user@host/db") from None


def _check_sqlite_folder(url: str) -> None:
    path = Path(url.removeprefix("sqlite:///"))
    if url != "sqlite:///:memory:" and not path.parent.is_dir():
        raise UsageError(f"cannot open storage {url!r}: folder {str(path.parent)!r} does not"
                         " exist; create it or pass another --storage")


# --- who runs a trial ---------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid from the original), if known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def this_worker() -> dict:
    """Which process runs a trial, so another can tell whether it still does; and under which
    memory allocator, since its speed depends on it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _process_start(pid),
            "allocator": allocator_in_use()}


def _is_alive(worker: dict) -> bool:
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = _process_start(worker["pid"])
    return started is None or worker.get("started") is None or started == worker["started"]


# --- interrupted trials -------------------------------------------------------------------


def is_interrupted(trial: FrozenTrial) -> bool:
    """Failed because its worker died (or was interrupted), not because of its plan."""
    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs


def retry_interrupted(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue the same parameters again; True when queued.

    A plan whose worker died in each of its ``MAX_RETRIES + 1`` runs (a crash in native code,
    the out-of-memory killer) is not queued again but recorded as one failed trial with that
    reason, which fills its place in ``--n-trials`` and shows in the report's failures.
    """
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    system_attrs = {"failed_trial": trial.number, "retry_history": history}
    if len(history) <= MAX_RETRIES:
        queued_with = {key: trial.user_attrs[key] for key in QUEUED_WITH
                       if key in trial.user_attrs}
        study.add_trial(optuna.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            system_attrs=system_attrs, user_attrs=queued_with))
        return True
    runs = ", ".join(map(str, history))
    plan = {key: trial.user_attrs[key] for key in ("plan", "plan_text") if key in trial.user_attrs}
    study.add_trial(optuna.create_trial(
        state=TrialState.FAIL, params=trial.params, distributions=trial.distributions,
        system_attrs={**system_attrs, "given_up": True}, user_attrs={**plan, "error": (
            f"its worker process died in all {len(history)} runs of this plan (trials {runs}):"
            " a crash in native code or the out-of-memory killer; not run again")}))
    return False


def first_run(trial: optuna.Trial) -> int:
    """The number of the trial whose plan ``trial`` runs again after interruptions, or its own
    on a first run. Seeded by it, a rerun draws the random numbers the first run drew: it
    ends as that run would have, and a technique's own training loop (AdapNet's) makes the
    model the checkpoints of the trainings after it were saved from."""
    history = trial.storage.get_trial_system_attrs(trial._trial_id).get("retry_history")
    return history[0] if history else trial.number


def retries_of(study: optuna.Study) -> dict[int, int]:
    """Interrupted trial number -> the number of the trial queued to run its plan again."""
    return {t.system_attrs["failed_trial"]: t.number for t in study.get_trials(deepcopy=False)
            if "failed_trial" in t.system_attrs}


def recover_dead_local_workers(study: optuna.Study) -> list[tuple[int, bool]]:
    """Fail (and queue again) the running trials whose worker process on this host is gone, and
    queue again the trials interrupted without a retry (a search stopped with Ctrl-C).
    Returns (trial number, queued again) pairs."""
    return fail_trials_of_dead_local_workers(study) + requeue_unretried(study)


def fail_trials_of_dead_local_workers(study: optuna.Study) -> list[tuple[int, bool]]:
    """Fail and queue again the RUNNING trials of processes on this host that no longer exist;
    returns (trial number, queued again) pairs.

    Safe while other workers run: of several processes that find the same dead trial, only the
    one whose ``tell`` fails it queues it again.
    """
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not worker or worker.get("host") != host or _is_alive(worker):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):
            continue  # another worker got there first
        recovered.append((trial.number, retry_interrupted(study, trial)))
    return recovered


def requeue_unretried(study: optuna.Study) -> list[tuple[int, bool]]:
    """Queue again the interrupted trials that have no retry (a search stopped with Ctrl-C
    fails its trial without one); for a search starting, not beside running workers.
    Returns (trial number, queued again) pairs."""
    retried = retries_of(study)
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if is_interrupted(trial) and trial.number not in retried and trial.params:
            requeued.append((trial.number, retry_interrupted(study, trial)))
    return requeued


def wait_for_trials_elsewhere(study: optuna.Study) -> list[tuple[int, bool]]:
    """Wait until the trials running now have ended: called once this machine's processes are
    done, so they are other machines' (``--storage``), and what follows (the report, a proxy
    search's choice of candidates) then holds them. Machines sharing a study end their shares a
    trial apart; a proxy search's machine that chose its candidates while another's last trial
    ran would confirm without that plan. A trial whose worker stops beating is failed and
    queued again, as at the start of a trial; returns (trial number, queued again) pairs for
    those.

    Only the trials running at the call are waited for: a machine with more trials to run
    (another ``--n-trials``) would otherwise hold this one until it ends."""
    running = running_trial_numbers(study)
    said = -math.inf
    while still := sorted(running & running_trial_numbers(study)):
        if time.monotonic() - said >= PROGRESS_EVERY_S:
            said = time.monotonic()
            log.info(f"waiting for trial(s) {', '.join(map(str, still))}, running elsewhere")
        optuna.storages.fail_stale_trials(study)
        time.sleep(ELSEWHERE_POLL_SECONDS)
    trials, retried = study.get_trials(deepcopy=False), retries_of(study)
    return [(n, n in retried and not trials[retried[n]].system_attrs.get("given_up"))
            for n in sorted(running) if is_interrupted(trials[n])]


def running_trial_numbers(study: optuna.Study) -> set[int]:
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
