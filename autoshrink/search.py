"""The search engine: one Optuna study per task, one trial per sampled plan.

A trial copies the trained baseline, runs its plan stage by stage (architecture rewrites ->
training techniques -> post-training -> quantization), measures the result on the validation
split and reports (accuracy, cost...) as objectives, with the accuracy drop against the budget as
an Optuna constraint. A failing plugin fails its trial, never the study.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import gc
import json
import logging
import time
import warnings
from pathlib import Path

import optuna
import torch
from torch import nn

from autoshrink import artifact, environment
from autoshrink.abort import EarlyAbort
from autoshrink.candidates import CandidatePool
from autoshrink.checkpoint import (
    Checkpoints,
    checkpoint_stem,
    kept_only_if_interrupted,
    remove_unneeded,
)
from autoshrink.config import (
    RUN_FOLDER_MARK,
    SearchConfig,
    config_from_json,
    config_to_json,
    lengths_text,
    task_setting_differences,
)
from autoshrink.errors import TrialAborted, TrialFailed, UnknownNameError, UsageError
from autoshrink.export import rebuild
from autoshrink.finer_quantization import quantize_within_budget
from autoshrink.metrics import complexity, count_macs, cpu_latency_ms
from autoshrink.pareto import (
    LABELS,
    Front,
    TrialRecord,
    baseline_from_study,
    best_reduction,
    pareto_front,
    records_from_study,
)
from autoshrink.plan import (
    TRAINING_LENGTH_PARAM,
    Plan,
    SamplingFailed,
    applicability,
    apply_stage,
    fixed_option_values,
    sample_plan,
)
from autoshrink.plugins import PluginHost
from autoshrink.progress import PROGRESS_EVERY_S, EpochProgress, TrialHeartbeat, search_progress
from autoshrink.sampler import make_sampler, trial_seed
from autoshrink.standby import StandbyWorkers
from autoshrink.start_plans import queue_start_trials, start_trials
from autoshrink.storage import (
    EARLIER_RUN_ATTR,
    PROXY_TRIAL_ATTR,
    START_PLAN_ATTR,
    fail_trials_of_dead_local_workers,
    first_run,
    is_interrupted,
    open_storage,
    recover_dead_local_workers,
    running_trial_numbers,
    wait_for_trials_elsewhere,
)
from autoshrink.task import (
    Baseline,
    Task,
    check_cache_writable,
    coarse_budget_warning,
    load_or_train_baseline,
    load_task,
    weak_baseline_warning,
)
from autoshrink.technique import RECIPE_EPOCHS, Stage, Technique, TrialContext
from autoshrink.termination import InterruptGate
from autoshrink.train import (
    TimeSpent,
    Trainer,
    configure_process,
    default_device,
    trains_in_bfloat16,
)
from autoshrink.workers import (
    gpu_processes_that_fit,
    processes_that_fit,
    spawning_search_is_gone,
    workers_beside,
)

log = logging.getLogger(__name__)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.FAIL)
MAX_REPEATS = 25  # consecutive already-measured plans before the search gives up
# Failed trials in a row before a process stops. Each technique is in about half the plans, so
# one broken plugin fails this many in a row with odds of 2**-25; a cause every trial shares
# does (the first GPU search failed 422 trials in 2.5 minutes, mixing CUDA and CPU tensors).
MAX_FAILURES_IN_A_ROW = 25
PRECISION_KEY = "training_precision"  # study attribute: "bfloat16" or "float32"
MARK_WRITE_WAIT_SECONDS = 1.0  # how long a run folder's mark may stay empty while written


def counts_towards_total(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial fills one of the ``--n-trials`` places: not a repeat of a measured plan,
    not interrupted with its worker (it is queued again), not started beyond the total."""
    return not ("duplicate_of" in trial.user_attrs or "surplus" in trial.user_attrs
                or is_interrupted(trial))


def count_distinct_finished(study: optuna.Study) -> int:
    """Finished trials that count towards ``--n-trials``."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED)
               if counts_towards_total(t))


def count_taken(study: optuna.Study, before: int | None = None) -> int:
    """Places taken by finished and running trials (only those numbered below ``before``)."""
    return sum(1 for t in study.get_trials(deepcopy=False,
                                           states=(*FINISHED, optuna.trial.TrialState.RUNNING))
               if counts_towards_total(t) and (before is None or t.number < before))


def record_training_precision(study: optuna.Study, task: Task) -> str:
    """Settle the precision of the study's training once, when it is created, and keep it on
    the study, so its ``--n-jobs`` workers, a resumed run and a machine joining it all train
    alike. Measured in each process (``--precision auto``), the choice could differ between
    them: on a busy machine the check read bf16 at 0.9x to 2.6x float32 (1.6x idle), on both
    sides of the 1.25x it needs."""
    macs = count_macs(task.build_model(), task.input_shape)
    bfloat16 = trains_in_bfloat16(task.recipe.precision, default_device(), macs)
    precision = "bfloat16" if bfloat16 else "float32"
    study.set_user_attr(PRECISION_KEY, precision)
    return precision


def study_trains_in_bfloat16(study: optuna.Study, task: Task) -> bool:
    """The precision recorded on the study; recorded now for a study created before
    autoshrink kept it."""
    recorded = study.user_attrs.get(PRECISION_KEY) or record_training_precision(study, task)
    return recorded == "bfloat16"


def log_interrupted(found: list[tuple[int, bool]]) -> None:
    """Say what became of interrupted trials: (trial number, queued again) pairs."""
    for number, queued in found:
        if queued:
            log.info(f"trial {number} was interrupted (its worker stopped); queued again with"
                     " the same plan")
        else:
            log.warning(f"trial {number} was interrupted (its worker stopped), as was every"
                        " earlier run of its plan: recorded as failed, not queued again")


EXCLUDED = "excluded by --techniques/--exclude"  # why a search leaves out an installed technique


def choose_techniques(config: SearchConfig,
                      host: PluginHost) -> tuple[dict[str, Technique], list[str]]:
    """The techniques a search may sample, and the installed ones it leaves out (sorted), all
    for one reason, ``EXCLUDED``."""
    installed = host.techniques
    wanted = {n: t for n, t in installed.items()
              if (not config.techniques or n in config.techniques) and n not in config.exclude}
    return wanted, sorted(n for n in installed if n not in wanted)


def check_names(config: SearchConfig, host: PluginHost) -> None:
    """Refuse unknown names before any data is loaded or anything is trained."""
    host.model(config.model)
    host.dataset(config.dataset)
    for name in (*config.techniques, *config.exclude):
        if name not in host.techniques:
            raise UnknownNameError("technique", name, list(host.techniques))
    if not choose_techniques(config, host)[0]:
        given = (f"--techniques {','.join(config.techniques)} with " if config.techniques
                 else "")
        raise UsageError(f"{given}--exclude {','.join(config.exclude)} leaves no technique to"
                         " search; exclude fewer")
    fixed_option_values(host.techniques, config.fixed_options)


def claim_run_folder(config: SearchConfig) -> None:
    """Refuse a run folder that cannot be written, or that holds another study's files.

    Model files and reports are named by trial number, so two studies in one folder would
    overwrite each other's results.
    """
    folder = config.run_dir
    mark = folder / RUN_FOLDER_MARK
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {str(folder)!r} is a file, not a folder; pass --out with a"
                         " folder (a new one is created)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        owner = _mark_folder_or_read_owner(mark, config.name)
    except OSError as error:
        raise UsageError(f"output folder {str(folder)!r} is not writable ({error.strerror});"
                         " pass --out with a folder you can write to") from None
    if owner not in (None, config.name):
        raise UsageError(f"output folder {str(folder)!r} already holds study {owner!r}, not"
                         f" {config.name!r}; pass another --out, or --study-name {owner} to"
                         " continue that study")


def _mark_folder_or_read_owner(mark: Path, name: str) -> str | None:
    """Write ``name`` into a new ``mark`` file, or return the study name an existing one holds.

    The exclusive create makes one of two searches started at the same instant the owner; the
    other may find the file still empty for a moment, so it waits for the name. A mark left
    empty for good (a process killed while writing it) claims nothing.
    """
    try:
        with open(mark, "x") as created:
            created.write(name + "\n")
        return None
    except FileExistsError:
        deadline = time.monotonic() + MARK_WRITE_WAIT_SECONDS
        while time.monotonic() < deadline:
            if owner := mark.read_text().strip():
                return owner
            time.sleep(0.01)
    mark.write_text(name + "\n")
    return None


def open_study(config: SearchConfig, task: Task) -> tuple[optuna.Study, bool]:
    """Create the study, or resume it when the same task already has one under that name;
    returns it and whether this call created it.

    Called before the baseline is trained, so a study of another task is refused at once. The
    sampler is seeded per trial (autoshrink.sampler), so a resumed search, a second worker or
    another machine does not replay the same random start.
    """
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study, described_by_another = create_or_load_study(config)
    study.sampler = make_sampler(config.sampler, config.seed)
    described = task.describe()
    if described_by_another:
        existing = study.user_attrs["task"]
        created = config_from_json(study.user_attrs["config"])
        if existing["key"] != described["key"]:
            differs = [f"{what} {described[what]!r} instead of {existing[what]!r}"
                       for what in ("model", "dataset") if described[what] != existing[what]]
            differs = differs or task_setting_differences(created, config)
            raise UsageError(
                f"study {config.name!r} already holds results for model {existing['model']!r}"
                f" on {existing['dataset']!r}; this search has"
                f" {', '.join(differs) or 'other data (files changed) or an older baseline'}:"
                " choose another --study-name or --out instead of mixing results")
        if tuple(study.user_attrs["objectives"]) != config.objectives:
            raise UsageError(
                f"study {config.name!r} was created with --objectives"
                f" {','.join(study.user_attrs['objectives'])}; use those or another --study-name")
        # each trial stores its constraint against the budget it ran under: a study of
        # several budgets would steer its sampler, early aborts and dashboards by mixed ones
        if created.budget != config.budget:
            flag = ("--proxy-max-drop" if created.is_proxy and created.proxy_max_drop is not None
                    else "--max-drop")
            raise UsageError(
                f"study {config.name!r} was created with {flag} {created.budget:g}; search it"
                f" at that budget, see its trials at {config.budget:g} pp with `autoshrink"
                f" report --max-drop {config.budget:g}`, or choose another --study-name")
        if as_text(created.fixed_options) != as_text(config.fixed_options):
            shown = set_flags(created.fixed_options) or "no --set"
            raise UsageError(f"study {config.name!r} was created with {shown}; hold the same"
                             " options or choose another --study-name")
        # Optuna refuses a parameter whose choices change within a study
        if created.training_lengths != config.training_lengths:
            raise UsageError(f"study {config.name!r} was created with --training-lengths"
                             f" {lengths_text(created.training_lengths)}; offer the same"
                             " lengths or choose another --study-name")
        return study, False
    describe_study(study, config, task)
    return study, True


def describe_study(study: optuna.Study, config: SearchConfig, task: Task) -> None:
    """Store on a new study what it searches: the task, the settings, the training precision
    and the size format."""
    study.set_metric_names(["accuracy", *config.objectives])
    study.set_user_attr("artifact_format", artifact.FORMAT)  # what its sizes are measured in
    record_training_precision(study, task)
    study.set_user_attr("task", task.describe())
    study.set_user_attr("objectives", list(config.objectives))
    study.set_user_attr("config", config_to_json(config))  # last: it marks the study described


DESCRIPTION_WAIT_SECONDS = 20.0


def create_or_load_study(config: SearchConfig) -> tuple[optuna.Study, bool]:
    """The study under ``config.name`` and whether another process has described it (its task
    and settings are stored on it).

    Processes started together race to create one study; only one creation succeeds, and the
    others wait for that process to describe it (a few writes later) instead of reading a half
    described study. A study left undescribed by a process that died in between is described
    by whichever process comes next.
    """
    storage = open_storage(config.storage_url)
    directions = ["maximize"] + ["minimize"] * len(config.objectives)
    deadline = time.monotonic() + DESCRIPTION_WAIT_SECONDS
    while True:
        try:
            return optuna.create_study(study_name=config.name, storage=storage,
                                       directions=directions), False
        except optuna.exceptions.DuplicatedStudyError:
            pass
        try:
            study = optuna.load_study(study_name=config.name, storage=storage)
        except KeyError:  # deleted meanwhile (its creator's baseline failed): create it again
            continue
        if "config" in study.user_attrs:
            return study, True
        if time.monotonic() > deadline:
            log.warning(f"study {config.name!r} was created but never described (the process"
                        " that created it may have died); describing it from this search")
            return study, False
        time.sleep(0.2)


def remove_half_written_models(study: optuna.Study, models: Path) -> None:
    """Delete the partial model files of trials that no longer run (another machine's may
    still be saving into a shared folder): a process killed while saving leaves one, which
    nothing would replace, as trial numbers are not used again."""
    running = {f"trial-{number}.pt" for number in running_trial_numbers(study)}
    for name, path in artifact.half_written(models):
        if name not in running:
            path.unlink(missing_ok=True)


def as_text(fixed: dict) -> dict:
    """Held options with their values as text, to compare a preset's with the command line's."""
    return {t: {k: str(v) for k, v in values.items()} for t, values in fixed.items() if values}


def set_flags(fixed: dict) -> str:
    """Held options as the ``--set TECH:OPTION=VALUE`` flags that hold them."""
    return " ".join(f"--set {t}:{k}={v}" for t, values in fixed.items() for k, v in values.items())


class Search:
    """Runs one search, logging its progress to ``autoshrink.search``.

    ``worker`` numbers the processes of one ``--n-jobs`` search (0 when there is one);
    ``standby`` holds worker processes the command started early (``autoshrink.standby``).
    """

    def __init__(self, config: SearchConfig, host: PluginHost, worker: int = 0,
                 standby: StandbyWorkers | None = None):
        self.config, self.host, self.worker, self.standby = config, host, worker, standby
        self._out_of_time = False  # set by optimize()
        self._interrupts = InterruptGate()
        self.warned_weak_baseline = False
        self.gave_up: str | None = None  # why trials kept failing, when this process stopped
        self._failures: list[str] = []  # reasons of the failed trials since the last other
        # a confirmation's proxy candidates (autoshrink.candidates), queued as trials end
        self.candidates: CandidatePool | None = None

    def run(self) -> optuna.Study:
        """Run the missing trials; fronts and reports are computed from the returned study."""
        study = self.prepare()
        if (left := self.trials_left(study)) <= 0:
            log.info(f"study {self.config.name!r} already has {self.config.n_trials - left}"
                     " trials; raise --n-trials to run more")
        else:
            self.run_trials(study, left)
            self._say_if_out_of_time(study)
        remove_unneeded(study, self.config.run_dir)
        return study

    def trials_left(self, study: optuna.Study) -> int:
        """``--n-trials`` less the places the study's finished and running trials take; in a
        confirmation, the candidates queued and still to queue, not the pool they come from."""
        if self.candidates is not None:
            return self.candidates.left_to_run(study, self.config.budget)
        return self.config.n_trials - count_taken(study)

    def _say_if_out_of_time(self, study: optuna.Study) -> None:
        config = self.config
        done = count_distinct_finished(study)
        if self._out_of_time and done < config.n_trials:
            log.info(f"stopped at the time limit (--timeout {config.timeout:g} s) with {done} of"
                     f" {config.n_trials} trials; re-run the same command to run the other"
                     f" {config.n_trials - done}")

    def run_trials(self, study: optuna.Study, left: int) -> None:
        """Run the study's ``left`` missing and queued trials here (:meth:`trials_left`), with
        worker processes beside this one when ``--n-jobs`` asks for more than one; return once
        the trials other machines were running have ended too, so that the report holds them.
        A trial interrupted meanwhile (a worker here that died after our last trial, one
        elsewhere that stopped beating) is run again here, unless under a time limit."""
        standby_bytes = 0 if self.standby is None else self.standby.held_memory()
        count = gpu_processes_that_fit(processes_that_fit(self._processes_wanted(left),
                                                          standby_bytes),
                                       self._trial_bytes_on_gpu())
        if count == 1:
            if self.standby is not None:  # not kept waiting through the whole search
                self.standby.dismiss()
            self.optimize(study)
            interrupted = []
        else:
            with workers_beside(count, self.config, self.host, self.standby):
                self.optimize(study)
            interrupted = fail_trials_of_dead_local_workers(study)
        interrupted += wait_for_trials_elsewhere(study)
        log_interrupted(interrupted)
        queued = any(again for _, again in interrupted)
        if queued and self.config.timeout is None:  # under a time limit the next run takes them
            self.optimize(study)

    def _processes_wanted(self, left: int) -> int:
        """The processes ``--n-jobs`` asks for, but no more than the ``left`` trials to run (a
        resumed study, or one that other machines work on, may have few left): each process
        loads the task and the baseline, so one with nothing to run only slows the others."""
        count, asked = min(self.config.workers, left), self.config.n_jobs
        if asked is not None and count < asked:
            log.info(f"{left} trial{'s' if left > 1 else ''} left to run, so {count}"
                     f" process{'es' if count > 1 else ''} instead of {asked}")
        return count

    def _trial_bytes_on_gpu(self) -> int:
        """The least a trial holds on a GPU: the training split (the trainer copies it there)
        and the baseline's weights four times over (weights, gradients, momentum, a copy)."""
        weights = sum(p.numel() * p.element_size() for p in self.baseline_model.parameters())
        return self.task.splits.train.x.nbytes + 4 * weights

    def prepare(self, threads: int | None = None) -> optuna.Study:
        """Check the input, load the task, open the study, load or train the baseline."""
        config = self.config
        check_names(config, self.host)
        self.techniques, skipped = choose_techniques(config, self.host)
        self.fixed_options = fixed_option_values(self.host.techniques, config.fixed_options)
        # checked before anything loads or trains, by the search (its workers' settings are its
        # own); queued once the study is open
        starting = [] if self.worker else start_trials(
            config.start_plans, self.host.techniques, self.techniques, self.fixed_options,
            config.training_lengths)
        configure_process(threads)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # we print failures ourselves
        check_cache_writable()
        task = load_task(config, self.host)
        self.task = task
        task.checked_model()  # before the run folder is claimed
        claim_run_folder(config)
        study, created = open_study(config, task)
        self.candidates = CandidatePool.from_study(study)
        environment.record(study)
        log.info(f"task: {task.model_spec.name} on {task.dataset}, input"
                 f" {'x'.join(map(str, task.input_shape))}, {len(task.splits.train)} train /"
                 f" {len(task.splits.val)} val / {len(task.splits.test)} test")
        log_interrupted(recover_dead_local_workers(study))
        remove_half_written_models(study, config.run_dir / "models")
        try:
            self.baseline_model, baseline = load_or_train_baseline(task,
                                                                   EpochProgress("baseline"))
        except BaseException:  # a baseline that failed or was stopped: no study of it remains
            if created and not study.get_trials(deepcopy=False):
                optuna.delete_study(study_name=study.study_name,
                                    storage=open_storage(config.storage_url))
            raise
        self.legacy_artifacts = "artifact_format" not in study.user_attrs
        baseline = self.baseline = self._study_baseline(study, baseline)
        log.info(f"baseline: val acc {baseline.val_accuracy * 100:.2f}%,"
                 f" {baseline.params:,} params, {baseline.macs:,} MACs,"
                 f" {baseline.size_bytes:,} bytes")
        coarse = coarse_budget_warning(baseline.val_accuracy, len(task.splits.val),
                                       config.budget)
        if coarse and not self.worker:  # said once, by the search, not by each worker
            log.warning(coarse)
        queue_start_trials(study, starting)
        if skipped:  # one line: --techniques prune-l1 leaves out twenty
            log.info(f"  not searched ({EXCLUDED}): {', '.join(skipped)}")
        for name, values in config.fixed_options.items():
            if name in skipped and not self.worker:  # a preset's options, or a --set, in vain
                log.warning(f"{set_flags({name: values})} has no effect: {name} is not"
                            f" searched ({EXCLUDED})")
        for name, reason in sorted(applicability(self.techniques, self.baseline_model).items()):
            if reason:
                log.info(f"  only after another rewrite, if at all: {name}: {reason}")
        self.trainer = Trainer(task.splits, task.recipe, seed=config.seed,
                               bfloat16=study_trains_in_bfloat16(study, task))
        return study

    def optimize(self, study: optuna.Study) -> None:
        """Run trials in this process until the study holds ``n_trials`` of them."""
        config = self.config
        done = count_distinct_finished(study)
        # a --n-jobs worker would repeat the line its parent printed a moment before
        (log.debug if self.worker else log.info)(
            f"study {config.name!r}: {done} trials done, running up to"
            f" {self._trials_planned(study) - done} more (max drop {config.budget:g} pp,"
            f" objectives accuracy + {', '.join(config.objectives)})")
        self._repeats = 0
        # Optuna collects garbage after every trial (freed models hold reference cycles). The
        # half a million objects of the libraries, data and baseline outlive the search, so they
        # are collected once and then frozen out of the collector's sight: 0.25 s less per trial.
        gc.collect()
        gc.freeze()
        start = self._progress_said = time.monotonic()
        self._started, self._done_before = start, done
        try:
            with self._interrupts.installed():
                study.optimize(self._objective, timeout=config.timeout, catch=(Exception,),
                               callbacks=[self._stop_when_done], gc_after_trial=True)
        finally:
            gc.unfreeze()
        # Optuna stops at the time limit once a trial ends past it; a search that ran out of
        # plans (MAX_REPEATS) or trials before then must not be told to re-run for time.
        self._out_of_time = (config.timeout is not None
                             and time.monotonic() - start >= config.timeout)

    def _stop_when_done(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Stop at n_trials distinct plans, or when the sampler only repeats itself.

        A worker process on this machine that died (killed, out of memory) left its trial
        RUNNING, which would hold one of the places: it is failed and queued again here at
        once, instead of by its heartbeat a minute later, which could come after the end.
        A Ctrl-C or SIGTERM held since the trial's training is raised here, now it is recorded.
        """
        self._interrupts.let_through()
        log_interrupted(fail_trials_of_dead_local_workers(study))
        self._say_progress(study)
        self._repeats = self._repeats + 1 if "duplicate_of" in trial.user_attrs else 0
        if trial.state == optuna.trial.TrialState.FAIL:
            self._failures.append(trial.user_attrs.get("error", "no reason recorded"))
        else:
            self._failures.clear()
        if self.worker and spawning_search_is_gone():
            study.stop()  # the next run of the command goes on, with workers it can see
        elif len(self._failures) >= MAX_FAILURES_IN_A_ROW:
            self.gave_up = keeps_failing(self._failures)
            log.error(f"stopping: {self.gave_up}")
            study.stop()
        elif self._repeats >= MAX_REPEATS:
            log.info(f"stopping: the last {MAX_REPEATS} sampled plans were all measured"
                     " before (the search space is exhausted)")
            study.stop()
        elif count_taken(study) >= self.config.n_trials:  # other workers' running trials too
            study.stop()
        elif self.candidates is not None and not self.candidates.keep_queued(
                study, self.config.budget, depth=self.config.workers):
            study.stop()  # every candidate still worth confirming is confirmed or running

    def _trials_planned(self, study: optuna.Study) -> int:
        """``--n-trials``; in a confirmation, the candidates taken and those left to run."""
        if self.candidates is None:
            return self.config.n_trials
        return count_taken(study) + self.trials_left(study)

    def _say_progress(self, study: optuna.Study) -> None:
        """At most once a minute, in the search's own process: trials done, time to go and
        the best result within the budget, so a long search shows where it stands."""
        now = time.monotonic()
        if self.worker or now - self._progress_said < PROGRESS_EVERY_S:
            return
        self._progress_said = now
        done = count_distinct_finished(study)
        objective, budget = self.config.objectives[0], self.config.budget
        front = pareto_front(records_from_study(study), objective, self.baseline, budget)
        best = (f"best within {budget:g} pp so far:"
                f" {best_reduction(front, self.baseline):.1f}x {LABELS[objective]}"
                f" (trial {front.members[0].number})" if front.members
                else f"none within {budget:g} pp yet")
        log.info(search_progress(done, self._trials_planned(study), now - self._started,
                                 done - self._done_before, best, self.config.timeout))

    # --- one trial ----------------------------------------------------------------------

    def _objective(self, trial: optuna.Trial):
        """Run one trial. An error that escapes with no reason recorded (outside the steps
        that record theirs) is recorded here: unrecorded, the trial would read as interrupted
        and not count, and a search whose every trial failed so would never end."""
        try:
            return self._run_trial(trial)
        except optuna.TrialPruned:
            raise
        except Exception as error:
            if "error" not in trial.user_attrs:
                self._record_failure(trial, None, error)
            raise

    def _run_trial(self, trial: optuna.Trial):
        start = time.perf_counter()
        # another worker started the last trial first (the lower numbers keep the places), or
        # a confirmation found its queue empty: it runs its candidates only, no sampled plan
        if count_taken(trial.study, before=trial.number) >= self.config.n_trials or (
                self.candidates is not None and PROXY_TRIAL_ATTR not in trial.user_attrs):
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise optuna.TrialPruned("the study already has its trials")
        seed = trial_seed(self.config.seed, first_run(trial))  # torch's, as the sampler's
        torch.manual_seed(seed)
        monitor = self._monitor()
        checkpoints = self._checkpoints(trial, monitor)
        ctx = trial_context(self.task, self.trainer, seed, monitor,
                            teacher=self.baseline_model, target_accuracy=self._floor(),
                            heartbeat=TrialHeartbeat(trial.number), checkpoints=checkpoints)
        self._timing = {"techniques": 0.0, "latency": 0.0}
        try:
            plan, model = self._in_techniques(sample_plan, trial, self.techniques,
                                              copy.deepcopy(self.baseline_model), ctx,
                                              self.fixed_options)
        except SamplingFailed as failure:
            self._record_plan(trial, failure.plan)
            self._record_failure(trial, failure.plan, failure.error)
            raise failure.error from None
        plan = dataclasses.replace(plan, training_length=self._training_length(trial, plan))
        sampled, plan = plan, self._as_it_ran_before(trial, plan)
        self._record_plan(trial, plan)
        self._warn_if_start_plan_changed(trial, plan)
        measured, given_up = self._same_params(trial)
        if measured is not None:
            return self._reuse(trial, measured, plan)
        if given_up is not None:
            self._refuse_given_up_plan(trial, plan, given_up)
        self.host.notify_trial_started(trial.number, plan)
        log.debug(f"trial {trial.number:>3}  started: {plan.describe()}")
        spent = dataclasses.replace(self.trainer.spent)
        # the trial queued again after an interruption has the same parameters
        checkpoints.stem = checkpoint_stem(self.config.run_dir, trial.study.study_name,
                                           trial.params)
        try:
            # the trial's long part, which never reads the study
            with self._interrupts.opened(), kept_only_if_interrupted(checkpoints):
                measured, used = self._evaluate(plan, model, ctx, trial.number)
        except TrialAborted as error:
            trial.set_user_attr("aborted", str(error))
            # the drop seen when stopped, as the constraint: the sampler then ranks the trial
            # with the infeasible ones instead of treating it as an unknown
            last_accuracy = monitor.curve[-1][2]
            set_constraint(trial, (self.baseline.val_accuracy - last_accuracy) * 100.0
                           - self.config.budget)
            self.host.notify_trial_finished(trial.number, plan, None, f"aborted: {error}")
            log.info(f"trial {trial.number:>3}  ABORTED {plan.describe()}: {error}")
            raise optuna.TrialPruned(str(error)) from None
        except Exception as error:
            if is_out_of_memory(error):
                del model
                release_memory()
            self._record_failure(trial, plan, error)
            raise
        finally:
            self._record_timing(trial, start, spent, monitor)
        # with what interrupted runs of the plan spent up to the checkpoint it went on from
        measured["seconds"] = time.perf_counter() - start + checkpoints.earlier_s
        if checkpoints.resumed_epochs:
            trial.set_user_attr("resumed_epochs", checkpoints.resumed_epochs)
        if used != sampled:  # a quantizer ran finer, or a pruner stopped short, of the sample
            trial.set_user_attr("sampled_plan_text", sampled.describe())
        if used != plan:
            self._record_plan(trial, used)
        return self._record(trial, used, measured)

    @staticmethod
    def _checkpoints(trial: optuna.Trial, monitor: EarlyAbort | None) -> Checkpoints:
        """Where the trial's trainings keep their states (autoshrink.checkpoint), with the
        early abort's curve so far; the trial queued again after an interruption goes on from
        them. Their files are named once the plan is sampled."""

        def restore(kept: dict) -> None:
            if monitor is not None:
                monitor.curve[:] = [tuple(point) for point in kept["curve"]]

        return Checkpoints(f"trial {trial.number:>3}", restore=restore,
                           keep=lambda: {"curve": [] if monitor is None else list(monitor.curve)})

    def _as_it_ran_before(self, trial: optuna.Trial, plan: Plan) -> Plan:
        """The plan a trial starts from: as sampled, or, for a trial queued to run a plan again
        (a proxy trial's, confirmed on the full task: autoshrink.confirm), with the options its
        quantizer and pruner ended with in that run, so that the model measured is the one
        reported. Started as sampled, a Fashion-MNIST candidate reported at 6-bit fixed point
        was confirmed at 4 bits, 25.8 pp below the baseline: its model before quantization
        missed the full task's floor too (by 0.5 pp), and then the quantizer is not run finer
        (autoshrink.finer_quantization)."""
        earlier = trial.user_attrs.get(EARLIER_RUN_ATTR)
        if earlier is None:
            return plan
        return plan.settled_as(Plan.from_json(earlier, self.host.techniques))

    def _warn_if_start_plan_changed(self, trial: optuna.Trial, plan: Plan) -> None:
        """A starting plan runs without the techniques that do not apply to the model (or to
        it as rewritten), or that change nothing there; the user is told which plan ran."""
        asked = trial.user_attrs.get(START_PLAN_ATTR)
        if asked is not None and asked != plan.describe():
            log.warning(f"trial {trial.number:>3}  starting plan {asked!r} runs as"
                        f" {plan.describe()!r}: the techniques left out do not apply to"
                        f" {self.task.model_spec.name} at that point of the plan")

    @staticmethod
    def _record_plan(trial: optuna.Trial, plan: Plan) -> None:
        trial.set_user_attr("plan", plan.to_json())
        trial.set_user_attr("plan_text", plan.describe())

    def _record_failure(self, trial: optuna.Trial, plan: Plan | None,
                        error: Exception) -> None:
        """Store, announce and log why the trial failed; the caller raises. Without a
        ``plan`` (an error outside the steps that hold one) observers are not told, and the
        log names the plan the trial recorded, if any."""
        # the engine's own reasons are sentences; anything else is named by its type
        message = (str(error) if isinstance(error, TrialFailed)
                   else f"{type(error).__name__}: {error}")
        if is_out_of_memory(error):
            message = f"out of memory: {message}"
        trial.set_user_attr("error", message)
        if plan is None:
            described = trial.user_attrs.get("plan_text", "?")
        else:
            described = plan.describe()
            self.host.notify_trial_finished(trial.number, plan, None, message)
        log.warning(f"trial {trial.number:>3}  FAILED  {described}: {message}")

    def _training_length(self, trial: optuna.Trial, plan: Plan) -> float:
        """The share of the recipe's epochs this trial trains for: a fidelity the sampler
        picks when ``--training-lengths`` offers several (a short run costs less and may be
        enough where most weights are inherited), recorded as the parameter
        ``training.length`` so a confirmation or a repeat trains for as long."""
        lengths = self.config.training_lengths
        if not plan.retrains:
            return 1.0
        if len(lengths) == 1:
            return lengths[0]
        return trial.suggest_categorical(TRAINING_LENGTH_PARAM, sorted(lengths))

    def _study_baseline(self, study: optuna.Study, measured: Baseline) -> Baseline:
        """The baseline every process of the study judges its trials against: the one the
        study recorded when it was created, as its reports do. A machine joining the study
        trained its own (its cache), whose accuracy can differ a little on other hardware;
        its weights are only where its trials start. A new study records this process's, with
        the size in the study's artifact format (the cache may have measured it in another)."""
        if "baseline" not in study.user_attrs:
            size = artifact.size_in_bytes(self.baseline_model, legacy=self.legacy_artifacts)
            baseline = dataclasses.replace(measured, size_bytes=size)
            study.set_user_attr("baseline", json.dumps(dataclasses.asdict(baseline)))
            return baseline
        recorded = baseline_from_study(study)
        # said by the search, not again by each of its workers
        if abs(recorded.val_accuracy - measured.val_accuracy) > 1e-9 and not self.worker:
            log.info(f"this machine's baseline measured val acc"
                     f" {measured.val_accuracy * 100:.2f}%, the study's"
                     f" {recorded.val_accuracy * 100:.2f}%: trials are judged against the"
                     f" study's, and start from this machine's weights")
        return recorded

    def _floor(self) -> float:
        """The lowest validation accuracy (in [0, 1]) that meets the budget."""
        return self.baseline.val_accuracy - self.config.budget / 100.0

    def _monitor(self) -> EarlyAbort | None:
        if not self.config.early_abort:
            return None
        return EarlyAbort(self.trainer, self.task.splits.val, self._floor())

    def _record_timing(self, trial: optuna.Trial, start: float, spent: TimeSpent,
                       monitor: EarlyAbort | None) -> None:
        """Where the trial's time went: training, evaluation (accuracy, latency), the
        techniques' own work, and the rest (the engine's), for ``benchmarks/default_search``."""
        now = self.trainer.spent
        timing = {"total": time.perf_counter() - start,
                  "training": now.training - spent.training,
                  "evaluating": now.evaluating - spent.evaluating, **self._timing}
        trial.set_user_attr("timing", timing)
        log.debug(f"trial {trial.number:>3}  seconds: "
                  + ", ".join(f"{key} {value:.1f}" for key, value in timing.items()))
        if monitor is not None and monitor.curve:
            trial.set_user_attr("val_curve", monitor.curve)
            log.debug(f"trial {trial.number:>3}  validation accuracy by epoch: "
                      + ", ".join(f"{epoch}/{epochs} {acc * 100:.1f}%"
                                  for epoch, epochs, acc in monitor.curve))

    def _record(self, trial: optuna.Trial, plan: Plan, measured: dict):
        drop = (self.baseline.val_accuracy - measured["val_accuracy"]) * 100.0
        set_constraint(trial, drop - self.config.budget)
        feasible = drop <= self.config.budget + 1e-9
        trial.set_user_attr("metrics", measured)
        trial.set_user_attr("accuracy_drop_pp", drop)
        trial.set_user_attr("feasible", feasible)  # for dashboards that ignore constraints
        self.host.notify_trial_finished(trial.number, plan, measured, None)
        self._log_trial(trial.number, plan, measured, drop, feasible)
        self._warn_if_baseline_looks_weak(trial.number, measured["val_accuracy"])
        costs = {"params": measured["nonzero_params"], "flops": measured["macs"],
                 "size": measured["size_bytes"]}
        return (measured["val_accuracy"], *(costs[o] for o in self.config.objectives))

    def _warn_if_baseline_looks_weak(self, number: int, accuracy: float) -> None:
        """Once, in the search's own process, as soon as one of its trials shows it: a long
        search against a weak baseline can then be stopped (``finish`` says it again)."""
        if self.worker or self.warned_weak_baseline:
            return
        warning = weak_baseline_warning(self.baseline.val_accuracy, accuracy, number,
                                        len(self.task.splits.val), self.config.budget,
                                        self.task.recipe.epochs)
        if warning:
            self.warned_weak_baseline = True
            log.warning(warning)

    def _log_trial(self, number: int, plan: Plan, measured: dict, drop: float,
                   feasible: bool) -> None:
        b = self.baseline
        log.info(
            f"trial {number:>3}  acc {measured['val_accuracy'] * 100:6.2f}%"
            f" (drop {drop:5.2f} pp) {'ok ' if feasible else 'OUT'}"
            f"  params {b.nonzero_params / max(measured['nonzero_params'], 1):6.1f}x"
            f"  MACs {b.macs / max(measured['macs'], 1):5.1f}x"
            f"  size {b.size_bytes / max(measured['size_bytes'], 1):5.1f}x"
            f"  {measured['seconds']:5.1f}s  {plan.describe()}")

    def _same_params(self, trial: optuna.Trial) -> tuple[optuna.trial.FrozenTrial | None,
                                                          optuna.trial.FrozenTrial | None]:
        """Earlier trials of the same plan, in one read of the study: one that was measured
        (its results are reused) and one given up because its worker died in every run
        (storage.retry_interrupted)."""
        measured = given_up = None
        for other in trial.study.get_trials(deepcopy=False, states=(
                optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)):
            if other.params != trial.params:
                continue
            if measured is None and "metrics" in other.user_attrs:
                measured = other
            elif given_up is None and other.system_attrs.get("given_up"):
                given_up = other
        return measured, given_up

    def _refuse_given_up_plan(self, trial: optuna.Trial, plan: Plan,
                              given_up: optuna.trial.FrozenTrial) -> None:
        """Fail at once: run again, the plan would most likely kill this process too. Like a
        repeat of a measured plan it fills no place and counts towards MAX_REPEATS."""
        trial.set_user_attr("duplicate_of", given_up.number)
        error = TrialFailed(f"the plan of trial {given_up.number}, whose worker died in every"
                            " run; not run again")
        self._record_failure(trial, plan, error)
        raise error

    def _reuse(self, trial: optuna.Trial, earlier: optuna.trial.FrozenTrial, plan: Plan):
        """An identical plan was already measured: record its results instead of retraining,
        with the plan as that trial ran it (its quantizer may have run finer than sampled)."""
        trial.set_user_attr("duplicate_of", earlier.number)
        if "sampled_plan_text" in earlier.user_attrs:
            trial.set_user_attr("sampled_plan_text", earlier.user_attrs["sampled_plan_text"])
            plan = dataclasses.replace(Plan.from_json(earlier.user_attrs["plan"],
                                                      self.host.techniques),
                                       training_length=plan.training_length)
            self._record_plan(trial, plan)
        measured = dict(earlier.user_attrs["metrics"], seconds=0.0)
        source = self.config.run_dir / "models" / f"trial-{earlier.number}.pt"
        if source.exists():
            target = source.with_name(f"trial-{trial.number}.pt")
            target.write_bytes(source.read_bytes())
        return self._record(trial, plan, measured)

    def _in_techniques(self, function, *args):
        """Call ``function`` and book its time, less any training inside, as technique work."""
        start, spent = time.perf_counter(), self.trainer.spent
        inner = spent.training + spent.evaluating
        try:
            return function(*args)
        finally:
            self._timing["techniques"] += (time.perf_counter() - start
                                           - (spent.training + spent.evaluating - inner))

    def _evaluate(self, plan: Plan, model: nn.Module, ctx: TrialContext,
                  number: int) -> tuple[dict, Plan]:
        """Train and measure ``model``, whose architecture rewrites are already applied;
        the training runs for the plan's share of the recipe's epochs. Also returns the plan
        as run: a quantizer that missed the budget may have run finer than sampled, and a
        pruner may have stopped short of its steps (``TrialContext.settle_options``)."""
        recipe = self.task.recipe
        model = self._in_techniques(apply_stage, plan, Stage.TRAINING, model, ctx)
        if plan.retrains:
            scratch = plan.trains_from_scratch
            epochs = recipe.epochs if scratch else recipe.finetune_epochs
            # the same fit the techniques' fine-tunes run: watched by the early abort, reported
            # by the trial's heartbeat
            ctx.finetune_fn(model, max_epochs=max(1, round(epochs * plan.training_length)),
                            lr=recipe.lr if scratch else recipe.finetune_lr, patience=None,
                            constant_lr=False, watched=True,
                            label="training" if scratch else "fine-tuning")
        model = self._in_techniques(apply_stage, plan, Stage.POST_TRAINING, model, ctx)
        plan = plan.with_options(ctx.settled_options)  # a pruner may have kept an earlier step
        counted = complexity(model, self.task.input_shape)  # before quantization
        quantized = self._in_techniques(quantize_within_budget, plan, model.eval(), ctx,
                                        self.fixed_options)
        model = quantized.model
        try:
            size = artifact.save(model, self.config.run_dir / "models" / f"trial-{number}.pt",
                                 legacy=self.legacy_artifacts)
        except Exception as error:
            raise TrialFailed(f"export failed: {type(error).__name__}: {error}") from error
        start = time.perf_counter()
        latency = cpu_latency_ms(model, self.task.input_shape)
        self._timing["latency"] = time.perf_counter() - start
        return {"val_accuracy": quantized.accuracy, "params": counted.params,
                "nonzero_params": counted.nonzero_params, "macs": counted.macs,
                "size_bytes": size, "latency_ms": latency}, quantized.plan


def keeps_failing(reasons: list[str]) -> str:
    """Why a process stopped after ``reasons``, failures in a row: the most common one."""
    reason, count = collections.Counter(reasons).most_common(1)[0]
    return (f"the last {len(reasons)} trials all failed, {count} of them with: {reason}; fix"
            " that and run the same command again (the study keeps its trials)")


def set_constraint(trial: optuna.Trial, value: float) -> None:
    """The budget constraint (<= 0: feasible), also under the key optuna-dashboard 0.21 reads
    (it predates Optuna 5's ``set_constraint`` and would show every trial as feasible)."""
    trial.set_constraint("accuracy_drop", value)
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [value])


def is_out_of_memory(error: Exception) -> bool:
    """Python's, CUDA's and the CPU allocator's way of saying it (the last is a RuntimeError)."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def release_memory() -> None:
    """Give back what a failed trial held, so the next one starts with the memory it had."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trial_context(task: Task, trainer: Trainer, seed: int,
                  monitor: EarlyAbort | None = None, teacher: nn.Module | None = None,
                  target_accuracy: float | None = None,
                  heartbeat: TrialHeartbeat | None = None,
                  checkpoints: Checkpoints | None = None) -> TrialContext:
    """What techniques get in a trial: fine-tuning on the task's splits (watched by the early
    abort ``monitor``, reported by the trial's ``heartbeat``, each saved in turn by the
    trial's ``checkpoints``), training batches, validation accuracy, the trained baseline."""

    def finetune(model, *, max_epochs, lr, patience, constant_lr, watched, label):
        recipe_length = max_epochs is None or max_epochs == RECIPE_EPOCHS
        epochs = task.recipe.finetune_epochs if recipe_length else max_epochs
        model = trainer.fit(model, epochs=epochs, lr=lr or task.recipe.finetune_lr,
                            patience=patience, constant_lr=constant_lr, callbacks=ctx.callbacks,
                            monitor=monitor if watched else None,
                            progress=heartbeat.fit(label) if heartbeat else None,
                            checkpoint=(checkpoints.next_training(label)
                                        if checkpoints else None))
        ctx.finetuned_accuracy = trainer.kept_accuracy
        return model

    def training_batches():
        drawn = trainer.training_batches(seed)
        return drawn if heartbeat is None else heartbeat.batches(drawn, trainer.steps_per_epoch)

    ctx = TrialContext(task.input_shape, task.splits.num_classes, finetune_fn=finetune,
                       calibration_fn=functools.partial(task.splits.train.full_batches,
                                                        task.recipe.batch_size),
                       batches_fn=training_batches,
                       batches_per_epoch=trainer.steps_per_epoch,
                       accuracy_fn=lambda model: trainer.accuracy(model, task.splits.val),
                       training_outputs_fn=trainer.training_outputs,
                       teacher=teacher, target_accuracy=target_accuracy, seed=seed)
    return ctx


def rebuild_trial_model(record: TrialRecord, task: Task, host: PluginHost,
                        run_dir: Path) -> nn.Module:
    """Re-create a trial's model from its plan and load its saved artifact (no training)."""
    plan = Plan.from_json(record.plan_json, host.techniques)
    state = artifact.load_state_dict(run_dir / "models" / f"trial-{record.number}.pt")
    return rebuild(task.build_model(), plan, task.input_shape, task.splits.num_classes, state)


def measure_test_accuracy(study: optuna.Study, fronts: list[Front], task: Task,
                          host: PluginHost, run_dir: Path) -> dict[int, str]:
    """Test-split accuracy of every Pareto member that lacks one; stored on the study.

    Returns the members that could not be measured, with the reason (e.g. a trial run by a
    worker on another machine whose model file is not in this run folder).
    """
    stored = dict(study.user_attrs.get("test_accuracy", {}))
    trainer = Trainer(task.splits, task.recipe)
    missing = {}
    for front in fronts:
        for record in front.members:
            if str(record.number) in stored or record.number in missing:
                continue
            if not (run_dir / "models" / f"trial-{record.number}.pt").is_file():
                missing[record.number] = (f"its model file is not in {run_dir / 'models'} (run"
                                          " by a worker with another --out?)")
                continue
            try:
                model = rebuild_trial_model(record, task, host, run_dir)
            except Exception as error:  # e.g. a damaged or tampered file: refused, not run
                missing[record.number] = (f"its model file could not be loaded"
                                          f" ({type(error).__name__}: {error})")
                continue
            stored[str(record.number)] = trainer.accuracy(model, task.splits.test)
    study.set_user_attr("test_accuracy", stored)
    return missing
