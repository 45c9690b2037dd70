"""``--n-jobs N`` (by default one per core): trials of one study side by side, in this process
and ``N - 1`` worker processes beside it.

This process has already checked the input, opened the study and trained (or loaded) the
baseline, so each worker only loads the task, takes the cached baseline and runs trials until the
study holds ``n_trials``; the study's storage is the only thing they share. This process runs
trials too instead of waiting: one interpreter with torch, the data and the baseline fewer in
memory. The cores are split between them, because two processes that each use every core run
slower than one. On a machine with several GPUs the processes take them in turn.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator

import torch

from autoshrink.config import SearchConfig
from autoshrink.memory import available_memory, private_memory
from autoshrink.plugins import PluginHost
from autoshrink.recipe import available_cores
from autoshrink.standby import StandbyWorkers
from autoshrink.termination import Terminated, sigterm_as_interrupt
from autoshrink.train import configure_threads

log = logging.getLogger(__name__)
PATIENCE_AFTER_INTERRUPT = 30  # seconds a worker gets to record its interrupted trial


# a process grows while it trains (on digits, 480 MB of private memory after the baseline,
# 600 MB after trials): a worker is expected to need this much more than this process holds now
GROWTH_IN_TRIALS = 1.25
# what a process holds on its GPU before any tensor: its CUDA context (527 MiB measured on an
# H200 with torch 2.11; the CUDA libraries' kernels loaded lazily, as by default)
CUDA_CONTEXT_BYTES = 527 * 2**20


def processes_that_fit(wanted: int, held_by_standby: int = 0) -> int:
    """``wanted`` processes, or as many as the memory free now holds beside this one (at least
    one): each worker loads the task, its data and the baseline as this process did. Too many
    workers ran the machine out of memory, and the system killed this process first, leaving
    its workers running unseen (63 workers of 0.5 GB each on a 24 GB machine).
    ``held_by_standby``: what standby workers (``autoshrink.standby``) already hold, counted as
    free, since it is part of what each of them needs as a worker."""
    free, held = available_memory(), private_memory()
    if wanted == 1 or free is None or not held:
        return wanted
    free += held_by_standby
    each = held * GROWTH_IN_TRIALS
    standby_share = (f" (with the {held_by_standby / 2**30:.1f} GiB that workers started early"
                     " hold already)" if held_by_standby else "")
    return _at_most(wanted, 1 + int(free // each),
                    f"{wanted} processes would need about {wanted * each / 2**30:.1f} GiB"
                    f" ({each / 2**30:.1f} GiB each) and {free / 2**30:.1f} GiB is free"
                    + standby_share)


def gpu_processes_that_fit(wanted: int, trial_bytes: int) -> int:
    """``wanted`` processes, or as many as the GPUs' free memory holds, with the processes
    spread over the GPUs in turn (``gpus_for_workers``). Each one on a GPU holds a CUDA
    context and what its trials allocate: the most this process's allocator has held so far
    (the baseline's training, where it ran here), at least ``trial_bytes``, times
    ``GROWTH_IN_TRIALS``. Only this process's GPU is asked (asking another would start a
    context there); the others are taken to be alike. Without it, processes sharing a small
    GPU would fail trial after trial out of memory."""
    if wanted == 1 or not torch.cuda.is_available():
        return wanted
    gpus = max(1, len(visible_gpus()))
    free, _ = torch.cuda.mem_get_info()
    each = (CUDA_CONTEXT_BYTES
            + max(torch.cuda.max_memory_reserved(), trial_bytes) * GROWTH_IN_TRIALS)
    fit = (1 + int(free // each)) * gpus  # this process already holds its share of GPU 0
    return _at_most(wanted, fit, f"{wanted} processes on {gpus} GPU(s) would need about"
                                 f" {each / 2**30:.1f} GiB of GPU memory each and"
                                 f" {free / 2**30:.1f} GiB is free on this process's GPU")


def _at_most(wanted: int, fit: int, shortage: str) -> int:
    """``wanted``, or ``fit`` with a warning that says the ``shortage`` where fewer fit."""
    if fit >= wanted:
        return wanted
    log.warning(f"warning: {shortage}: running {fit}; pass a smaller --n-jobs to choose")
    return fit


@contextlib.contextmanager
def workers_beside(count: int, config: SearchConfig, host: PluginHost,
                   standby: StandbyWorkers | None = None) -> Iterator[None]:
    """Run ``count - 1`` worker processes while the body runs trials here, with this
    process on its share of the cores; on leaving, wait for the workers (at most
    ``PATIENCE_AFTER_INTERRUPT`` s after an error or Ctrl-C) and give this process every core
    again. The processes of ``standby`` (``autoshrink.standby``: started early, already past
    their imports) are taken first, and new ones started for the rest."""
    cores = available_cores()
    threads = max(1, cores // count)
    shared = (f"; more processes than the {cores} core(s), so they take turns on them"
              if count > cores else "")
    gpus = gpus_for_workers(count)
    on_gpus = (f", on GPUs {', '.join(dict.fromkeys(g for g in gpus if g))} in turn"
               if any(gpus) else "")
    log.info(f"running trials in {count} processes (this one and {count - 1} more),"
             f" {threads} thread(s) each{shared}{on_gpus}")
    level = logging.getLogger("autoshrink").getEffectiveLevel()
    arguments = [(config, host.explicit, index, threads, level, gpus[index])
                 for index in range(1, count)]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked state
    if standby is None:
        records = context.Queue()  # workers' log records are handled by this process's loggers
        processes = []
    else:
        records, processes = standby.records, standby.take(arguments)
    for index, worker in enumerate(arguments[len(processes):], start=len(processes) + 1):
        processes.append(context.Process(target=_worker_main, args=(*worker, records),
                                         name=f"autoshrink-worker-{index}"))
        processes[-1].start()
    forwarding = threading.Thread(target=_forward, args=(records, processes), daemon=True)
    forwarding.start()
    configure_threads(threads)
    try:
        yield
    except BaseException as error:  # on Ctrl-C the workers got the signal too: let them record it
        if isinstance(error, Terminated):  # sent to this process alone: pass it on
            for process in processes:
                process.terminate()  # SIGTERM; nothing for a worker that has ended
        _wait_for(processes, PATIENCE_AFTER_INTERRUPT)
        raise
    else:
        _wait_for(processes, None)
    finally:
        forwarding.join()
        configure_threads()  # test accuracy and reports may use every core again
    for process in processes:
        if process.exitcode != 0:  # its unfinished trial was queued again and run here
            log.warning(f"warning: {process.name} stopped early ({how_it_ended(process.exitcode)});"
                        " this process ran the trials it left")


def gpus_for_workers(count: int) -> list[str | None]:
    """The GPU of each of ``count`` processes (this one first), as CUDA_VISIBLE_DEVICES names
    it: with several GPUs they take them in turn (this process trains on the first visible
    one), so the workers do not all queue on one GPU while the others idle. None for every
    process where there are fewer than two GPUs: nothing to spread."""
    visible = visible_gpus()
    if len(visible) < 2:
        return [None] * count
    return [visible[index % len(visible)] for index in range(count)]


def visible_gpus() -> list[str]:
    """The GPUs this process can use, named as CUDA_VISIBLE_DEVICES names them (an index or a
    UUID), so that a worker given one of them sees exactly that GPU."""
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range(count)]
    return [name.strip() for name in listed.split(",") if name.strip()][:count]


def how_it_ended(exit_code: int) -> str:
    """A process's end in words: Linux's out-of-memory killer ends a worker with SIGKILL, which
    multiprocessing reports as exit code -9, a number that says nothing of memory."""
    if exit_code >= 0:
        return f"exit code {exit_code}"
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        return f"exit code {exit_code}"
    cause = (": the system may have run out of memory (see dmesg), or it was killed by hand"
             if -exit_code == signal.SIGKILL else "")
    return f"exit code {exit_code}, killed by {name}{cause}"


def spawning_search_is_gone() -> bool:
    """In a ``--n-jobs`` worker process: whether the search process that started it died
    (killed, or crashed in native code). The worker then stops after its trial; before, it ran
    the study to its end unseen, its log lost, beside the workers of the command run again."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def _wait_for(processes: list, patience: float | None) -> None:
    for process in processes:
        process.join(timeout=patience)
        if process.is_alive():
            process.kill()
            process.join()


def _forward(records, processes: list) -> None:
    """Hand the workers' log records to this process's loggers until every worker is gone."""
    while any(p.is_alive() for p in processes) or not records.empty():
        try:
            record = records.get(timeout=0.2)
        except queue.Empty:
            continue
        logging.getLogger(record.name).handle(record)


def _worker_main(config: SearchConfig, explicit: tuple[str, ...], index: int, threads: int,
                 level: int, gpu: str | None, records) -> None:
    if gpu is not None:  # before anything starts CUDA, which reads it once
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    from autoshrink.search import Search  # noqa: PLC0415 (imported in the child process)

    root = logging.getLogger("autoshrink")
    # the parent already logged the task, its data and the baseline: only trial lines from
    # here (without a handler, Python's last resort would print the warnings of prepare again),
    # and only through the parent (a forked worker inherits its handler: autoshrink.standby)
    for inherited in list(root.handlers):
        root.removeHandler(inherited)
    root.addHandler(logging.NullHandler())
    try:
        # the search's process passes SIGTERM on, and Slurm sends it to every process of a job:
        # a second one must not end the worker before it records its trial
        with sigterm_as_interrupt(then=signal.SIG_IGN):
            search = Search(config, PluginHost.discover(explicit=explicit), worker=index)
            study = search.prepare(threads=threads)
            forward = logging.handlers.QueueHandler(records)
            forward.setFormatter(logging.Formatter(f"[worker {index}] %(message)s"))
            root.addHandler(forward)
            root.setLevel(level)
            search.optimize(study)
    except KeyboardInterrupt:
        sys.exit(130)
