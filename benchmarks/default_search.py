"""The default search from a cold start: wall time, reductions at 5 pp, peak memory, and where
the trials' time goes (training, evaluation, everything else = the engine's overhead).

Run: ``python -m benchmarks.default_search [extra search flags]``. It starts
``autoshrink search --max-drop 5`` in a fresh process with an empty baseline cache, so the
time includes training the baseline; peak RSS is that process's (and its workers') maximum.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from autoshrink.search import count_distinct_finished


def overhead(study: optuna.Study) -> dict:
    """Where the trial loop's wall time went: from the first trial's start to the last one's
    end, the sum of the measured parts, and the rest (sampling, storage, garbage collection
    between trials, copies, counting, export) as the engine's."""
    trials = [t for t in study.trials if t.datetime_complete is not None]
    timings = [t.user_attrs["timing"] for t in trials if "timing" in t.user_attrs]
    shares = {key: sum(t[key] for t in timings)
              for key in ("training", "evaluating", "latency", "techniques")}
    shares["total"] = (max(t.datetime_complete for t in trials)
                       - min(t.datetime_start for t in trials)).total_seconds()
    shares["engine"] = shares["total"] - sum(v for k, v in shares.items() if k != "total")
    return shares | {"trials": len(trials)}


def main(extra: list[str]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="autoshrink-bench-"))
    env = {"AUTOSHRINK_CACHE_DIR": str(folder / "cache")}
    argv = [sys.executable, "-m", "autoshrink.cli", "search", "--max-drop", "5", "--json",
            "--out", str(folder / "run"), *extra]
    print("running:", " ".join(argv[2:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = json.loads(done.stdout)
    baseline = json.loads(next((folder / "cache").glob("baselines/*/metrics.json")).read_text())
    study = optuna.load_study(study_name=summary["study"]["name"],
                              storage=summary["study"]["storage"])
    shares = overhead(study)
    states = [t.state.name for t in study.trials]
    print(f"wall time {wall:.1f} s (goal <= 180 s), of which baseline training"
          f" {baseline['train_seconds']:.1f} s")
    print(f"peak RSS {peak_mb:,.0f} MB (goal <= 2048 MB)")
    print(f"trials: {count_distinct_finished(study)} counted, {states.count('COMPLETE')} complete,"
          f" {states.count('PRUNED')} aborted early, {states.count('FAIL')} failed,"
          f" {summary['feasible']} feasible")
    for metric, goal in (("params", 50), ("flops", 20), ("size", None)):
        best = summary["fronts"][metric]["best_reduction"]
        print(f"best {metric} reduction at 5 pp: {best or 0:.1f}x"
              + (f" (goal >= {goal}x)" if goal else ""))
    total = shares["total"]
    print(f"trial loop {total:.1f} s over {shares['trials']} trials: training"
          f" {shares['training'] / total:.1%}, evaluation (accuracy + latency)"
          f" {(shares['evaluating'] + shares['latency']) / total:.1%}, the techniques' own"
          f" work (with sampling their options) {shares['techniques'] / total:.1%}, engine"
          f" (sampling, storage, garbage collection, copies, counting, export)"
          f" {shares['engine'] / total:.1%} (goal <= 5%)")
    outside = wall - shares["total"] - baseline["train_seconds"]
    print(f"outside the trial loop (start-up, data, study, test accuracy, reports):"
          f" {outside:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
