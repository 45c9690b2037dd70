"""Shared set-up for the benchmark scripts: the machine they ran on, a task, its cached baseline
and a trainer."""

from __future__ import annotations

import time

import torch

from autoshrink.config import build_config
from autoshrink.environment import describe
from autoshrink.plugins import PluginHost
from autoshrink.recipe import available_cores
from autoshrink.task import load_or_train_baseline, load_task
from autoshrink.train import Trainer, configure_process


def prepare(**settings):
    """(host, task, baseline model, baseline metrics, trainer) for the given search settings."""
    configure_process()
    host = PluginHost.discover()
    config = build_config(None, settings)
    task = load_task(config, host)
    model, metrics = load_or_train_baseline(
        task, lambda epoch, epochs, loss: print(f"  baseline epoch {epoch}/{epochs}"
                                                f" loss {loss:.3f}", flush=True))
    return host, task, model, metrics, Trainer(task.splits, task.recipe, seed=config.seed)


def machine_line() -> str:
    """The machine a benchmark ran on, for its printout: figures compare only between runs on
    the same kind of CPU (the README gives them per kind), and the model name alone does not
    say which kind it is."""
    hardware = describe()["hardware"]  # what a study records of its machine
    return (f"machine: {hardware['cpu']} ({hardware['cpu_instructions']}),"
            f" {available_cores()} core(s), torch {torch.__version__}")


def sgemm_peak_gflops(repeats: int = 5) -> float:
    """The best float32 matrix-multiplication rate over a few sizes and repeats, on the threads
    torch uses: the machine's speed at the time. This machine is shared, and its rate moves
    even within a session (from 246 to 326 GFLOP/s in stop 75's first hour), so a benchmark's
    times compare only beside it."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def speed_line() -> str:
    """The machine's speed just after a timed run, for its printout (see sgemm_peak_gflops)."""
    return (f"machine speed just after the run: sgemm {sgemm_peak_gflops():.0f} GFLOP/s on"
            f" {torch.get_num_threads()} threads (compare times between runs at similar rates)")
