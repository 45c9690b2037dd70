"""Shared set-up for the benchmark scripts: a task, its cached baseline and a trainer."""

from __future__ import annotations

from autoshrink.config import build_config
from autoshrink.plugins import PluginHost
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
