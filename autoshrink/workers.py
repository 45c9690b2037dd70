"""``--n-jobs N`` (by default one per core): local worker processes that run trials of one
study side by side.

The parent has already checked the input, opened the study and trained (or loaded) the baseline,
so each worker only loads the task, takes the cached baseline and runs trials until the study
holds ``n_trials``; the study's storage is the only thing they share. The cores are split
between them, because two processes that each use every core run slower than one.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import queue
import sys

from autoshrink.config import SearchConfig
from autoshrink.plugins import PluginHost
from autoshrink.train import available_cores

log = logging.getLogger(__name__)


def run_workers(config: SearchConfig, host: PluginHost) -> None:
    count = config.workers
    threads = max(1, available_cores() // count)
    log.info(f"starting {count} worker processes, {threads} thread(s) each")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
    records = context.Queue()  # workers' log records are handled by the parent's loggers
    level = logging.getLogger("autoshrink").getEffectiveLevel()
    processes = [context.Process(target=_worker_main, name=f"autoshrink-worker-{index}",
                                 args=(config, host.explicit, index, threads, records, level))
                 for index in range(1, count + 1)]
    for process in processes:
        process.start()
    try:
        while any(p.is_alive() for p in processes) or not records.empty():
            try:
                record = records.get(timeout=0.2)
            except queue.Empty:
                continue
            logging.getLogger(record.name).handle(record)
    finally:  # on Ctrl-C the workers got the signal too: wait for them to record it
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        log.warning(f"warning: {', '.join(failed)} stopped with an error; the study keeps every"
                    " finished trial, re-run the same command to complete it")


def _worker_main(config: SearchConfig, explicit: tuple[str, ...], index: int, threads: int,
                 records, level: int) -> None:
    from autoshrink.search import Search  # noqa: PLC0415 (imported in the child process)

    try:  # the parent already logged the task and the baseline: only trial lines from here
        search = Search(config, PluginHost.discover(explicit=explicit), worker=index)
        study = search.prepare(threads=threads)
        forward = logging.handlers.QueueHandler(records)
        forward.setFormatter(logging.Formatter(f"[worker {index}] %(message)s"))
        root = logging.getLogger("autoshrink")
        root.addHandler(forward)
        root.setLevel(level)
        search.optimize(study)
    except KeyboardInterrupt:
        sys.exit(130)
