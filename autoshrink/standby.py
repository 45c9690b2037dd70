"""Worker processes made ready while the search itself starts.

A ``--n-jobs`` worker needs torch, scikit-learn and Optuna: about 5.5 s of imports on the AMD
EPYC cores without AVX-512, which, started once the baseline is ready, kept one core from trials
for that long (the default search's worker began its first trial 7.2-8.0 s after the search's
own). So the workers are made ready while the search starts, and then wait, asleep, for what the
search hands them once it has checked the input, opened the study and trained or loaded the
baseline (``autoshrink.workers.workers_beside``). Workers the search does not need after all (a
finished study, fewer that fit in memory, an error) are stopped.

Run as a program on Linux, the ``search`` command imports those libraries first and then forks
its workers: a forked worker shares the libraries' memory with the search instead of holding a
copy of its own (840 against 1,280 MB for two processes that trained smallcnn,
docs/performance.md). A fork is safe only from a process that has run no torch computation yet
(a child forked after GNU OpenMP started its threads hangs at its first parallel region) and has
not started CUDA, which holds for a command that imported torch itself moments before on a
machine without a GPU driver (``can_fork_workers``). Anywhere else (called from Python with
torch loaded, GPU machines, other systems) the workers are spawned before the search imports
anything, and each imports alongside it.

This module imports no torch: the command loads it before anything heavy.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator

from autoshrink.memory import available_memory, unshared_memory
from autoshrink.recipe import available_cores

# present where a GPU driver is loaded (NVIDIA's, AMD's), whose devices a process forked after
# CUDA or ROCm started cannot use
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/kfd")
PATIENCE = 5  # seconds a dismissed standby worker gets to exit before it is killed
# what a worker may come to hold, for the free memory a standby one must find: a process holds
# 0.47 GB after its imports and 0.6-0.8 GB on digits once it trains (docs/performance.md)
WORKER_BYTES = 2**30


class StandbyWorkers:
    """``count`` processes, each waiting for its worker arguments (a process the search does
    not take is stopped): forked from this process, which has imported the search's libraries
    (``fork``), or spawned, each importing them first."""

    def __init__(self, count: int, fork: bool = False):
        # a lock that another thread (a plugin's, say) holds at the fork stays held in the child
        fork = fork and threading.active_count() == 1
        context = multiprocessing.get_context("fork" if fork else "spawn")
        # their log records, for this process's loggers: a queue that the workers the search
        # spawns later, when it needs more than these, can be handed too
        self.records = multiprocessing.get_context("spawn").Queue()
        self._waiting: list[tuple[multiprocessing.Process, object]] = []
        if fork:
            sys.stdout.flush()  # or a child would write this process's buffered output again
            sys.stderr.flush()
            gc.freeze()  # so that a child's garbage collection leaves the shared objects alone
        try:
            for index in range(1, count + 1):
                receiving, sending = context.Pipe(duplex=False)
                # a forked child holds copies of this process's ends of the pipes: it closes
                # them, or it would never see end-of-file when this process dies
                inherited = [*(end for _, end in self._waiting), sending] if fork else []
                process = context.Process(target=_import_then_wait,
                                          args=(receiving, self.records, inherited),
                                          name=f"autoshrink-worker-{index}")
                process.start()
                receiving.close()  # the child's end: it sees end-of-file if this process dies
                self._waiting.append((process, sending))
        finally:
            if fork:
                gc.unfreeze()

    def take(self, arguments: list[tuple]) -> list[multiprocessing.Process]:
        """Start waiting processes as workers, one per item of ``arguments`` (its
        ``autoshrink.workers._worker_main`` arguments but the last, the log queue: ``records``)
        while they last, and stop the others; returns the processes started, in the order of
        ``arguments``."""
        taken, self._waiting = self._waiting[:len(arguments)], self._waiting[len(arguments):]
        for (_, sending), worker_arguments in zip(taken, arguments):
            sending.send(worker_arguments)
            sending.close()
        self.dismiss()
        return [process for process, _ in taken]

    def held_memory(self) -> int:
        """Bytes the waiting processes hold for themselves already (their imports): memory the
        system no longer counts as free but that is part of what they need as workers."""
        return sum(unshared_memory(process.pid) or 0 for process, _ in self._waiting)

    def dismiss(self) -> None:
        """Stop the processes still waiting, or still importing: they are terminated rather
        than left to finish their imports, so that an error ends the command at once."""
        waiting, self._waiting = self._waiting, []
        for process, sending in waiting:
            sending.close()
            process.terminate()
        for process, _ in waiting:
            process.join(PATIENCE)
            if process.is_alive():
                process.kill()
                process.join()


def can_fork_workers() -> bool:
    """Whether the command may import the search's libraries and then fork its workers: on
    Linux, before torch is loaded (so none of its computations has started threads), on a
    machine without a GPU driver (a library that asks for devices as it loads would start
    one). Asked before the command loads anything."""
    return (sys.platform == "linux" and "torch" not in sys.modules
            and not any(os.path.exists(path) for path in GPU_DRIVER_PATHS))


def standby_count(workers: int) -> int:
    """How many of a search's ``workers`` to start early: no more than the other cores (any
    more would take turns with this process's own imports and baseline) or the free memory
    holds; the rest start once the search knows how many fit (``autoshrink.workers``)."""
    free = available_memory()
    fit = workers if free is None else free // WORKER_BYTES
    return max(0, min(workers, available_cores() - 1, fit))


@contextlib.contextmanager
def standby_workers(workers: int, fork: bool = False) -> Iterator[StandbyWorkers | None]:
    """Up to ``workers`` standby workers for the block (``standby_count``; None when that is
    0), and the ones it did not take stopped when it ends, also when it raises."""
    count = standby_count(workers)
    if count < 1:
        yield None
        return
    standby = StandbyWorkers(count, fork)
    try:
        yield standby
    finally:
        standby.dismiss()


def _import_then_wait(receiving, records, inherited: list) -> None:
    if inherited:
        _leave_the_parents_state(inherited)
    try:
        # the slow imports this process is for: the search's modules and, through them, torch,
        # and scikit-learn's splitting, which loading the task imports (autoshrink.data)
        import sklearn.model_selection  # noqa: F401, PLC0415

        import autoshrink.search  # noqa: F401, PLC0415
        from autoshrink import workers  # noqa: PLC0415

        arguments = receiving.recv()
    except (EOFError, KeyboardInterrupt):  # the search ended first, or Ctrl-C reached us
        return
    # a worker on one of several GPUs sets CUDA_VISIBLE_DEVICES first: none of the imports
    # above starts CUDA, which reads it once
    workers._worker_main(*arguments, records)


def _leave_the_parents_state(inherited: list) -> None:
    """What a forked child must not keep of the search's process while it waits: its ends of
    the standby pipes and its signal handlers (its log handler goes in ``_worker_main``)."""
    for end in inherited:
        end.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
