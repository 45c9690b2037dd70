"""The default search from a cold start: wall time, reductions at 5 pp, peak memory, and where
the trials' time goes (training, evaluation, everything else = the engine's overhead).

Run: ``python -m benchmarks.default_search [extra search flags]``. It starts
``autoshrink search --max-drop 5`` in a fresh process with an empty baseline cache, so the
time includes training the baseline; peak memory is the most that process and its worker
processes held together at one time (shared library pages counted once), sampled every 0.2 s.
Every other process that maps torch's libraries meanwhile takes its share of their pages, so this
script imports torch only after the run and names any such process before it (another search or
a test run): the figure reads low beside them.
The machine's sgemm rate, measured just after the run, says how fast the shared machine was
at the time. The run folder (its path is printed first) stays for a closer look at the trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna

TORCH_LIBRARY = "libtorch_cpu"  # mapped by every process that imported torch


def overhead(study: optuna.Study) -> dict:
    """Where the trial loops' time went: for each worker process, from its first trial's start
    to its last one's end (summed over workers), the sum of the measured parts, and the rest
    (sampling, storage, garbage collection between trials, copies, counting, export) as the
    engine's; how long after the first process the last one started its first trial
    (``start_lag``: a worker's start-up, while the other process already runs trials); and
    the memory allocator each process ran under (``allocators``)."""
    trials = [t for t in study.trials if t.datetime_complete is not None]
    timings = [t.user_attrs["timing"] for t in trials if "timing" in t.user_attrs]
    shares = {key: sum(t[key] for t in timings)
              for key in ("training", "evaluating", "latency", "techniques")}
    loops: dict[int | None, list] = {}
    for trial in trials:
        loops.setdefault(trial.user_attrs.get("worker", {}).get("pid"), []).append(trial)
    shares["total"] = sum(map(_span, loops.values()))
    shares["engine"] = shares["total"] - sum(v for k, v in shares.items() if k != "total")
    firsts = [min(t.datetime_start for t in loop) for loop in loops.values()]
    allocators = [loop[0].user_attrs.get("worker", {}).get("allocator", "?")
                  for loop in loops.values()]
    return shares | {"trials": len(trials), "workers": len(loops), "span": _span(trials),
                     "start_lag": (max(firsts) - min(firsts)).total_seconds(),
                     "allocators": allocators}


def lost_after_training(study: optuna.Study, floor: float) -> dict:
    """Completed trials below the budget's accuracy ``floor``, their share of the trials' time,
    and how many of them were still at or above it at their last early-abort check (one epoch
    before the end of their last checked training): what those lost came after, in the last
    epoch or a post-training step: all 63 such trials of 617 stored ones carried a quantizer
    (stop 47, docs/performance.md)."""
    def seconds(trials) -> float:
        return sum(t.user_attrs.get("timing", {}).get("total", 0.0) for t in trials)

    trials = study.get_trials(deepcopy=False)
    below = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
             and "metrics" in t.user_attrs and t.user_attrs["metrics"]["val_accuracy"] < floor]
    every = seconds(trials)  # aborted and failed trials' time too
    return {"over_budget": len(below), "time_share": seconds(below) / every if every else 0.0,
            "within_at_last_check": sum(1 for t in below if t.user_attrs.get("val_curve")
                                        and t.user_attrs["val_curve"][-1][2] >= floor)}


def over_budget_line(lost: dict) -> str:
    """The first part of the over-budget line both search benchmarks print."""
    return (f"over budget: {lost['over_budget']} complete trials, {lost['time_share']:.1%} of"
            " the trials' time")


def trial_time_line(shares: dict) -> str:
    """Where the trial loops' time went (``overhead``), as both search benchmarks print it."""
    total = shares["total"]
    return (f"trial loops {total:.1f} s over {shares['trials']} trials in"
            f" {shares['workers']} process(es): training {shares['training'] / total:.1%},"
            f" evaluation (accuracy + latency)"
            f" {(shares['evaluating'] + shares['latency']) / total:.1%}, the techniques' own"
            f" work (with sampling their options) {shares['techniques'] / total:.1%}, engine"
            f" (sampling, storage, garbage collection, copies, counting, export)"
            f" {shares['engine'] / total:.1%}")


def _span(trials: list) -> float:
    """Seconds from the first trial's start to the last one's end."""
    return (max(t.datetime_complete for t in trials)
            - min(t.datetime_start for t in trials)).total_seconds()


def tree_memory_mb(root: int) -> float:
    """Memory held by process ``root`` and all its descendants together: the sum of their
    proportional set sizes (resident pages, each shared page split between the processes that
    map it), so the libraries every worker maps are counted once, not once per process."""
    return sum(process_memory_mb(root).values())


def process_memory_mb(root: int) -> dict[int, float]:
    """The proportional set size of process ``root`` and of each of its descendants, by pid."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree, grown = {root}, True
    while grown:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    sizes = {}
    for pid in tree:
        with contextlib.suppress(OSError):
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            sizes[pid] = int(next((line.split()[1] for line in rollup.splitlines()
                                   if line.startswith("Pss:")), 0)) / 1024
    return sizes


def processes_mapping(library: str) -> list[int]:
    """The processes, other than this one, that map a file whose name contains ``library``."""
    found = []
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            if int(maps.parent.name) != os.getpid() and library in maps.read_text():
                found.append(int(maps.parent.name))
    return sorted(found)


@dataclasses.dataclass
class MemoryPeak:
    """The most the process tree held at one sample: when, and how it was split."""

    total_mb: float = 0.0
    seconds: float = 0.0  # after the start
    by_process: list[float] = dataclasses.field(default_factory=list)  # the root's first

    def describe(self) -> str:
        split = " + ".join(f"{mb:,.0f}" for mb in self.by_process)
        return (f"{self.total_mb:,.0f} MB at {self.seconds:.0f} s, {len(self.by_process)}"
                f" processes ({split} MB, the search's own first)")


def run_measuring_memory(argv: list[str],
                         env: dict) -> tuple[subprocess.CompletedProcess, MemoryPeak]:
    """Run ``argv``, sampling the memory of its whole process tree (workers included) every
    0.2 s; returns the finished process and the peak, with its moment and its split."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    peak, stop = MemoryPeak(), threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            sizes = process_memory_mb(process.pid)
            if sum(sizes.values()) > peak.total_mb:
                peak.total_mb = sum(sizes.values())
                peak.seconds = time.perf_counter() - start
                peak.by_process = [sizes.pop(process.pid, 0.0), *sorted(sizes.values(),
                                                                        reverse=True)]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    stop.set()
    sampler.join()
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr), peak


def main(extra: list[str]) -> None:
    if {"-h", "--help"} & set(extra):  # the flags are the search's; it would print no JSON
        print(__doc__)
        return
    folder = Path(tempfile.mkdtemp(prefix="autoshrink-bench-"))
    env = {"AUTOSHRINK_CACHE_DIR": str(folder / "cache")}
    argv = [sys.executable, "-m", "autoshrink.cli", "search", "--max-drop", "5", "--json",
            "--out", str(folder / "run"), *extra]
    print("running:", " ".join(argv[2:]), flush=True)
    if others := processes_mapping(TORCH_LIBRARY):
        print(f"note: {len(others)} other process(es) hold torch's libraries (pids"
              f" {', '.join(map(str, others))}); they take a share of the shared pages, so the"
              " peak memory below reads low", flush=True)
    start = time.perf_counter()
    done, peak = run_measuring_memory(argv, {**os.environ, **env})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    from autoshrink.search import count_distinct_finished  # torch: only now (see the module)
    from benchmarks.common import machine_line, speed_line

    summary = json.loads(done.stdout)
    baseline = json.loads(next((folder / "cache").glob("baselines/*/metrics.json")).read_text())
    study = optuna.load_study(study_name=summary["study"]["name"],
                              storage=summary["study"]["storage"])
    shares = overhead(study)
    states = [t.state.name for t in study.trials]
    print(machine_line())
    print(speed_line())
    print(f"wall time {wall:.1f} s (goal <= 180 s), of which baseline training"
          f" {baseline['train_seconds']:.1f} s")
    print(f"peak memory {peak.total_mb:,.0f} MB, all processes together (proportional set size;"
          f" goal <= 2048 MB): {peak.describe()}")
    print(f"trials: {count_distinct_finished(study)} counted, {states.count('COMPLETE')} complete,"
          f" {states.count('PRUNED')} aborted early, {states.count('FAIL')} failed,"
          f" {summary['feasible']} feasible")
    lost = lost_after_training(study, summary["baseline"]["val_accuracy"]
                               - summary["max_drop"] / 100)
    print(f"{over_budget_line(lost)}; {lost['within_at_last_check']} of them were within budget"
          " at their last early-abort check and lost it after (a quantizer, as a rule)")
    for metric, goal in (("params", 50), ("flops", 20), ("size", None)):
        best = summary["fronts"][metric]["best_reduction"]
        print(f"best {metric} reduction at 5 pp: {best or 0:.1f}x"
              + (f" (goal >= {goal}x)" if goal else ""))
    print(f"{trial_time_line(shares)} (goal <= 5%)")
    print("memory allocator of the processes that ran trials:",
          ", ".join(shares["allocators"]), "(autoshrink.allocator)")
    if shares["workers"] > 1:
        print(f"the last worker process started its first trial {shares['start_lag']:.1f} s"
              " after the first one did (its start-up: imports, data, the cached baseline)")
    outside = wall - shares["span"] - baseline["train_seconds"]
    print(f"outside the trial loop (start-up, data, study, test accuracy, reports):"
          f" {outside:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
