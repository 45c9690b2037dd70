"""Seed 003's VGG-19 search on one GPU, sized to minutes: wall time and the best reductions at
5 pp, beside the paper's 82x params / 38x FLOPs (CIFAR-10, full-length training).

It runs the ``seed003-vgg19-gpu`` preset (VGG-19 on Fashion-MNIST at 32x32, every technique,
params / MACs / size) with shorter training than the preset's 30 + 10 epochs and a time limit,
in a fresh process with an empty baseline cache, so the wall time includes the baseline. While
it runs, ``nvidia-smi`` is read every second for the GPU's memory in use and its busy share.

Run: ``python -m benchmarks.vgg19_gpu_search [--minutes M] [--epochs E] [--finetune-epochs F]
[--n-jobs N] [--data-dir DIR] [--keep DIR]``; ``--keep`` copies the study's database there. The
figures are read from the study, so a run stopped from outside (``timeout`` sends SIGTERM), as a
lease of device time may need, still reports what its finished trials measured.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import torch

from autoshrink.pareto import (
    baseline_from_study,
    best_reduction,
    pareto_front,
    records_from_study,
)
from benchmarks.default_search import (
    lost_after_training,
    over_budget_line,
    overhead,
    trial_time_line,
)

PAPER = {"params": 82.0, "flops": 38.0}  # seed 003, VGG-19 on CIFAR-10


class GpuSampler:
    """Peak memory in use and mean busy share of GPU 0 from ``nvidia-smi``, read every second
    (all processes on it together, the CUDA contexts included)."""

    def __init__(self) -> None:
        self.memory_mb: list[float] = []
        self.busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        query = ["nvidia-smi", "--id=0", "--query-gpu=memory.used,utilization.gpu",
                 "--format=csv,noheader,nounits"]
        while not self._stop.wait(1.0):
            done = subprocess.run(query, capture_output=True, text=True)
            if done.returncode == 0:
                memory, busy = done.stdout.split(",")
                self.memory_mb.append(float(memory))
                self.busy.append(float(busy))

    def summary(self) -> str:
        if not self.busy:
            return "GPU not sampled (no nvidia-smi)"
        return (f"GPU memory in use at most {max(self.memory_mb):,.0f} MiB; busy"
                f" {sum(self.busy) / len(self.busy):.0f} % of the samples' time on average")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0,
                        help="the search's --timeout: no trial starts after it")
    parser.add_argument("--epochs", type=int, default=8, help="baseline epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--n-jobs", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST's folder")
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark is for one (the search would train"
                         " VGG-19 on the CPU for days)")
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="autoshrink-vgg19-"))
    argv = [sys.executable, "-m", "autoshrink.cli", "search", "--study", "seed003-vgg19-gpu",
            "--epochs", str(args.epochs), "--finetune-epochs", str(args.finetune_epochs),
            "--n-trials", "1000", "--timeout", str(args.minutes * 60),
            "--out", str(folder / "run")]
    argv += ["--n-jobs", str(args.n_jobs)] if args.n_jobs else []
    argv += ["--data-dir", args.data_dir] if args.data_dir else []
    print("running:", " ".join(argv[2:]), flush=True)
    env = {**os.environ, "AUTOSHRINK_CACHE_DIR": str(folder / "cache")}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: report
    start, gpu, ended = time.perf_counter(), GpuSampler(), False
    try:
        with gpu:
            ended = subprocess.run(argv, env=env).returncode == 0
    finally:
        wall = time.perf_counter() - start
        database = folder / "run" / "study.db"
        if args.keep and database.exists():
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(database, args.keep / "study.db")
        if database.exists():
            report(database, folder / "cache", wall, gpu, ended)


def report(database: Path, cache: Path, wall: float, gpu: GpuSampler, ended: bool) -> None:
    storage = f"sqlite:///{database}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0],
                              storage=storage)
    if "baseline" not in study.user_attrs:
        print(f"stopped after {wall / 60:.1f} min, before the baseline was measured")
        return
    baseline, records = baseline_from_study(study), records_from_study(study)
    max_drop = json.loads(study.user_attrs["config"])["max_drop"]
    trained = json.loads(next(cache.glob("baselines/*/metrics.json")).read_text())
    print(f"wall time {wall / 60:.1f} min{'' if ended else ' (stopped from outside)'}, of which"
          f" baseline training {trained['train_seconds']:.0f} s; baseline accuracy val"
          f" {baseline.val_accuracy:.2%}, test {baseline.test_accuracy:.2%}")
    print(gpu.summary())
    states = collections.Counter(t.state.name for t in study.trials)
    feasible = sum(r.feasible(baseline, max_drop) for r in records)
    print(f"trials: {states['COMPLETE']} complete, {states['PRUNED']} aborted early,"
          f" {states['FAIL']} failed (interrupted ones too), {feasible} within {max_drop:g} pp")
    unrecorded = "no reason recorded (stopped while running)"
    errors = collections.Counter(t.user_attrs.get("error", unrecorded).splitlines()[0][:160]
                                 for t in study.trials if t.state.name == "FAIL")
    for error, count in errors.most_common():
        print(f"  failed {count}x: {error}")
    lost = lost_after_training(study, baseline.val_accuracy - max_drop / 100)
    print(over_budget_line(lost))
    for metric in ("params", "flops", "size"):
        front = pareto_front(records, metric, baseline, max_drop)
        best = best_reduction(front, baseline)
        paper = f" (seed 003: {PAPER[metric]:g}x)" if metric in PAPER else ""
        trial = f", trial {front.members[0].number}" if front.members else ""
        print(f"best {metric} reduction at {max_drop:g} pp: {best or 0:.1f}x{paper}{trial}")
    if records:
        print(trial_time_line(overhead(study)))


if __name__ == "__main__":
    main()
