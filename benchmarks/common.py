"""Shared set-up for the benchmark scripts: the machine they ran on, a task, its cached baseline
and a trainer."""

from __future__ import annotations

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
