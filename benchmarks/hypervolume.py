"""Sample efficiency: hypervolume after N trials, our default sampler against random search.

For each seed, two studies of the default task run N trials each, one with ``--sampler tpe``
(the default) and one with ``--sampler random``; everything else is equal (same baseline, same
early abort). The hypervolume is the area, in (validation accuracy, -log10 non-zero params), that
the feasible trials dominate above the reference point (the budget's accuracy floor, the
baseline's parameter count): larger is better, and only points within the 5 pp budget count.
Run: ``python -m benchmarks.hypervolume [N] [seeds] [samplers]`` (default 40 trials, 3 seeds,
``tpe,random``).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from autoshrink.pareto import baseline_from_study, front_area, pareto_front, records_from_study
from benchmarks.common import machine_line

MAX_DROP = 5.0


def study_hypervolume(study: optuna.Study) -> float:
    """The params front's area (autoshrink.pareto.front_area) with accuracy as a fraction, the
    unit this benchmark has always printed."""
    baseline = baseline_from_study(study)
    front = pareto_front(records_from_study(study), "params", baseline, MAX_DROP)
    return front_area(front, baseline) / 100


def run(folder: Path, sampler: str, seed: int, trials: int) -> tuple[float, float]:
    out = folder / f"{sampler}-{seed}"
    argv = [sys.executable, "-m", "autoshrink.cli", "search", "--max-drop", str(MAX_DROP),
            "--n-trials", str(trials), "--seed", str(seed), "--sampler", sampler, "--quiet",
            "--json", "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(argv, env={**os.environ, "AUTOSHRINK_CACHE_DIR": str(folder / "cache")},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {sampler} search of seed {seed} failed:\n{done.stderr}")
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name="digits-smallcnn", storage=f"sqlite:///{out}/study.db")
    return study_hypervolume(study), seconds


def main(trials: int, seeds: int, samplers: tuple[str, ...]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="autoshrink-hv-"))
    print(machine_line())
    print(f"default task, {trials} trials per study, max drop {MAX_DROP:g} pp")
    print(f"{'seed':>4} " + " ".join(f"{name + ' HV':>10} {name + ' s':>9}" for name in samplers))
    volumes = {name: [] for name in samplers}
    for seed in range(seeds):
        cells = []
        for name in samplers:
            volume, seconds = run(folder, name, seed, trials)
            volumes[name].append(volume)
            cells.append(f"{volume:>10.4f} {seconds:>9.0f}")
        print(f"{seed:>4} " + " ".join(cells), flush=True)
    if len(samplers) == 2:
        ratios = [a / b if b else math.inf for a, b in zip(*volumes.values(), strict=True)]
        print("ratios " + ", ".join(f"{r:.2f}x" for r in ratios))
        print(f"mean hypervolume ratio {samplers[0]} / {samplers[1]}:"
              f" {sum(ratios) / len(ratios):.2f}x (goal >= 1.2x)")


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Positional, as every recorded run was started that way."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hypervolume",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("trials", nargs="?", type=int, default=40,
                        help="trials per study (default 40)")
    parser.add_argument("seeds", nargs="?", type=int, default=3,
                        help="seeds 0 to N-1 (default 3)")
    parser.add_argument("samplers", nargs="?", default="tpe,random",
                        help="comma-separated --sampler values (default tpe,random)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_arguments(sys.argv[1:])
    main(arguments.trials, arguments.seeds, tuple(arguments.samplers.split(",")))
