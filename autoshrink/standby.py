"""Worker processes that load their libraries while the search itself starts.

A ``--n-jobs`` worker needs torch, torchvision (through ptflops and the ResNet plugins),
scikit-learn and Optuna: about 5.5 s of imports on the AMD EPYC cores without AVX-512, which,
started once the baseline is ready, kept one core from trials for that long (the default
search's worker began its first trial 7.2-8.0 s after the search's own). The search's process
spends about as long importing the same libraries first, with the other cores idle. So the
``search`` command starts its workers before it imports them: each imports alongside, then
waits, asleep, for what the search hands it once it has checked the input, opened the study and
trained or loaded the baseline (``autoshrink.workers.workers_beside``). Workers the search
does not need after all (a finished study, fewer that fit in memory, an error) are stopped.

This module imports no torch: the command loads it before anything heavy.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator

from autoshrink.memory import available_memory, private_memory
from autoshrink.recipe import available_cores

PATIENCE = 5  # seconds a dismissed standby worker gets to exit before it is killed
# what a worker may come to hold, for the free memory a standby one must find: a process holds
# 0.47 GB after its imports and 0.6-0.8 GB on digits once it trains (docs/performance.md)
WORKER_BYTES = 2**30


class StandbyWorkers:
    """``count`` spawned processes, each importing the search's libraries and then waiting
    for its worker arguments (a process the search does not take is stopped)."""

    def __init__(self, count: int):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked state
        self.records = context.Queue()  # their log records, for this process's loggers
        self._waiting: list[tuple[multiprocessing.Process, object]] = []
        for index in range(1, count + 1):
            receiving, sending = context.Pipe(duplex=False)
            process = context.Process(target=_import_then_wait, args=(receiving, self.records),
                                      name=f"autoshrink-worker-{index}")
            process.start()
            receiving.close()  # the child's end: it sees end-of-file if this process dies
            self._waiting.append((process, sending))

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
        return sum(private_memory(process.pid) or 0 for process, _ in self._waiting)

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


def standby_count(workers: int) -> int:
    """How many of a search's ``workers`` to start early: no more than the other cores (any
    more would take turns with this process's own imports and baseline) or the free memory
    holds; the rest start once the search knows how many fit (``autoshrink.workers``)."""
    free = available_memory()
    fit = workers if free is None else free // WORKER_BYTES
    return max(0, min(workers, available_cores() - 1, fit))


@contextlib.contextmanager
def standby_workers(workers: int) -> Iterator[StandbyWorkers | None]:
    """Up to ``workers`` standby workers for the block (``standby_count``; None when that is
    0), and the ones it did not take stopped when it ends, also when it raises."""
    count = standby_count(workers)
    if count < 1:
        yield None
        return
    standby = StandbyWorkers(count)
    try:
        yield standby
    finally:
        standby.dismiss()


def _import_then_wait(receiving, records) -> None:
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
