"""Trainer throughput against a plain DataLoader + NCHW loop, and against the machine's peak.

Both loops train the same model on the same data with the same optimizer and schedule; the
plain loop is what most training scripts do (``DataLoader(TensorDataset(...), shuffle=True)``,
NCHW tensors, float32, the C library's allocator with its default settings). Our trainer runs
as a search process does (``autoshrink.allocator``: under tcmalloc where it is installed,
otherwise with glibc keeping freed memory), twice: held to float32, and at its default
precision (bf16 autocast where the CPU measured it faster, see ``autoshrink.train``); the plain
loop runs again beside it, to show what the allocator alone gives. Each rate is the median of
``ROUNDS`` measurements: one measurement of seed 000's small CNN moved by a third between runs
of the script. Each model is measured in fresh processes of its own, as a search trains one
task per process (after VGG-11's and ResNet-18's loops in the same process the small CNN
trained 0.84-0.97x as fast): the plain loop under the C library's defaults in one, the other
three loops, taking turns within each round, in another started as a search starts its
workers. Effective GFLOP/s counts 6 FLOPs per MAC per sample (forward 2, backward about 4, the
usual estimate); the peak is float32 matrix multiplication (sgemm) measured in the same run.
Run: ``python -m benchmarks.trainer_throughput`` (Fashion-MNIST when installed, else digits).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from autoshrink.allocator import (
    allocator_in_use,
    environment_under_tcmalloc,
    retain_freed_memory,
    tcmalloc_library,
)
from autoshrink.config import build_config
from autoshrink.data import Splits
from autoshrink.metrics import count_macs
from autoshrink.plugins import PluginHost
from autoshrink.recipe import Recipe
from autoshrink.task import Task, load_task
from autoshrink.train import Trainer, configure_threads
from benchmarks.common import machine_line, sgemm_peak_gflops

SAMPLES = 12_288  # at most, per measured epoch: the same subset for both loops
WORK = 1.5e12  # training FLOPs per loop and epoch: fewer samples for larger models
EPOCHS = 2
ROUNDS = 3


def plain_loop(model, x, y, recipe: Recipe, epochs: int) -> None:
    """The common baseline: DataLoader over a TensorDataset, NCHW, one-cycle SGD."""
    loader = DataLoader(TensorDataset(x, y), batch_size=recipe.batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=True, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, epochs=epochs,
                                                    steps_per_epoch=len(loader))
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss.item()  # what a loop that logs its loss does every batch


@dataclasses.dataclass
class Workload:
    """One model's task and the training subset both loops run on."""

    model_name: str
    task: Task
    splits: Splits
    macs: int

    @property
    def samples(self) -> int:
        return len(self.splits.train)


def workload(model_name: str, dataset: str, input_size: int | None) -> Workload:
    config = build_config(None, {"model": model_name, "dataset": dataset,
                                 "input_size": input_size})
    task = load_task(config, PluginHost.discover())
    train = task.splits.train
    macs = count_macs(task.build_model(), task.input_shape)
    n = int(min(SAMPLES, len(train), WORK / (6 * macs)) // 64 * 64)
    subset = dataclasses.replace(task.splits, train=train.head(n))
    return Workload(model_name, task, subset, macs)


def plain_rate(work: Workload, epochs: int = EPOCHS) -> float:
    """Samples per second of the plain loop."""
    model = work.task.build_model()
    start = time.perf_counter()
    plain_loop(model, work.splits.train.x, work.splits.train.y, work.task.recipe, epochs)
    return work.samples * epochs / (time.perf_counter() - start)


def trainer_rate(work: Workload, precision: str, epochs: int = EPOCHS) -> tuple[float, bool]:
    """Samples per second of our trainer at ``precision``, and whether it trained in bf16."""
    model = work.task.build_model()
    # the trainer's speed check, once per process, is not part of the training
    trainer = Trainer(work.splits, dataclasses.replace(work.task.recipe, precision=precision),
                      task_macs=work.macs)
    start = time.perf_counter()
    trainer.fit(model, epochs=epochs, lr=work.task.recipe.lr)
    return work.samples * epochs / (time.perf_counter() - start), trainer.bfloat16


MODELS = (("smallcnn", None), ("vgg11", 32), ("resnet18", 32))  # (name, --input-size)


@dataclasses.dataclass
class Row:
    """One model's measurements (samples per second, medians of ``ROUNDS``)."""

    model_name: str
    input_shape: tuple[int, ...]
    macs: int
    samples: int
    plain_default: float  # the plain loop under the C library's allocator and its defaults
    plain_kept: float  # the same loop as a search process allocates (autoshrink.allocator)
    float32: float  # our trainer held to float32
    default: float  # our trainer at its default precision
    bfloat16: bool  # whether the default trained in bf16
    allocator: str  # the search process's: "tcmalloc" or "system"


def measure_plain(model_name: str, input_size: int | None, dataset: str) -> float:
    """The plain loop's rate, in the calling process, with the C library's defaults."""
    configure_threads()
    work = workload(model_name, dataset, input_size)
    return statistics.median(plain_rate(work) for _ in range(ROUNDS))


def measure_as_search(model_name: str, input_size: int | None, dataset: str,
                      plain_default: float) -> Row:
    """The other three loops, taking turns, in the calling process, which allocates as a search
    process does; ``plain_default`` is :func:`measure_plain`'s rate, from its own process."""
    configure_threads()
    work = workload(model_name, dataset, input_size)
    retain_freed_memory()  # what a search process sets, where glibc allocates
    rounds = [(plain_rate(work), trainer_rate(work, "float32")[0], *trainer_rate(work, "auto"))
              for _ in range(ROUNDS)]
    kept_rates, float32_rates, default_rates, bfloat16_flags = zip(*rounds)
    kept, float32, default = map(statistics.median, (kept_rates, float32_rates, default_rates))
    return Row(work.model_name, tuple(work.task.input_shape), work.macs, work.samples,
               plain_default, kept, float32, default,
               bfloat16=bfloat16_flags[0],  # decided once per process (autoshrink.train)
               allocator=allocator_in_use())


def in_fresh_process(function, *args, environ: dict[str, str]):
    """``function(*args)`` in a new interpreter, whose heap and threads no other model used,
    started with ``environ``."""
    with mock.patch.dict(os.environ, environ, clear=True), ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def measure(model_name: str, input_size: int | None, dataset: str) -> Row:
    """All four loops on one model, in two fresh processes (see the module)."""
    plain = in_fresh_process(measure_plain, model_name, input_size, dataset,
                             environ=dict(os.environ))
    as_search = environment_under_tcmalloc(os.environ, tcmalloc_library()) or dict(os.environ)
    return in_fresh_process(measure_as_search, model_name, input_size, dataset, plain,
                            environ=as_search)


def main() -> None:
    configure_threads()
    print(f"{machine_line()}, {torch.get_num_threads()} threads")
    peak = sgemm_peak_gflops()
    print(f"sgemm peak: {peak:.1f} GFLOP/s")
    dataset = "fashion-mnist"
    try:
        load_task(build_config(None, {"dataset": dataset}), PluginHost.discover())
    except Exception:
        dataset = "digits"
    print(f"data: {dataset}, {EPOCHS} epochs per loop (samples: at most {SAMPLES:,}, fewer for"
          f" larger models), the median of {ROUNDS} measurements of each loop, each model in a"
          " fresh process")
    header = (f"{'model':<9} {'input':>8} {'MACs':>12} {'samples':>8} {'plain/s':>8}"
              f" {'+alloc/s':>8} {'float32/s':>9} {'speed-up':>8} {'default/s':>9}"
              f" {'precision':>9} {'speed-up':>8} {'GFLOP/s':>8} {'of peak':>8}")
    print(header, flush=True)
    allocators = set()  # the same in every row, unless a fresh process could not load tcmalloc
    for model_name, input_size in MODELS:
        row = measure(model_name, input_size, dataset)
        allocators.add(row.allocator)
        gflops = row.default * 6 * row.macs / 1e9
        print(f"{row.model_name:<9} {'x'.join(map(str, row.input_shape)):>8}"
              f" {row.macs:>12,} {row.samples:>8,} {row.plain_default:>8.0f}"
              f" {row.plain_kept:>8.0f} {row.float32:>9.0f}"
              f" {row.float32 / row.plain_default:>7.2f}x {row.default:>9.0f}"
              f" {'bfloat16' if row.bfloat16 else 'float32':>9}"
              f" {row.default / row.plain_default:>7.2f}x {gflops:>8.1f} {gflops / peak:>7.0%}",
              flush=True)
    print("plain: the plain loop under the C library's allocator, as a script runs it;"
          " +alloc: the same loop allocating as a search process does"
          f" ({' / '.join(sorted(allocators))}: see"
          " autoshrink.allocator); float32: our trainer held to float32; default: its default"
          " precision (auto), which trains in bf16 where this CPU measured it faster, for"
          " models of 1M MACs or more; speed-ups against the plain loop; GFLOP/s and peak"
          " share are the default's, against float32 sgemm")


if __name__ == "__main__":
    main()
