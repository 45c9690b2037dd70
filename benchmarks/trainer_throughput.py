"""Trainer throughput against a plain DataLoader + NCHW loop, and against the machine's peak.

Both loops train the same model on the same data with the same optimizer and schedule; the
plain loop is what most training scripts do (``DataLoader(TensorDataset(...), shuffle=True)``,
NCHW tensors, float32, the C library's memory settings); it runs again with the memory setting
a search process makes (``autoshrink.allocator``), to show what that alone gives. Ours runs
twice: held to float32, and at its default precision (bf16 autocast where the CPU measured it
faster, see ``autoshrink.train``). Each rate is the median of ``ROUNDS`` measurements: one
measurement of seed 000's small CNN moved by a third between runs of the script. The plain
loop with the C library's settings is measured first, for every model, because the search
process's memory setting cannot be undone within a process; the other three loops take turns
within each round. Effective GFLOP/s counts
6 FLOPs per MAC per sample (forward 2, backward about 4, the usual estimate); the peak is
float32 matrix multiplication (sgemm) measured in the same run. Run: ``python -m
benchmarks.trainer_throughput`` (Fashion-MNIST when installed, else digits).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from autoshrink.allocator import retain_freed_memory
from autoshrink.config import build_config
from autoshrink.data import Splits
from autoshrink.metrics import count_macs
from autoshrink.plugins import PluginHost
from autoshrink.recipe import Recipe, available_cores
from autoshrink.task import Task, load_task
from autoshrink.train import Trainer, configure_threads

SAMPLES = 12_288  # at most, per measured epoch: the same subset for both loops
WORK = 1.5e12  # training FLOPs per loop and epoch: fewer samples for larger models
EPOCHS = 2
ROUNDS = 3


def sgemm_peak_gflops(repeats: int = 5) -> float:
    """The best float32 matrix-multiplication rate over a few sizes and repeats."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


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
    subset = dataclasses.replace(task.splits, train=type(train)(train.x[:n], train.y[:n]))
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


def main() -> None:
    configure_threads()
    print(f"{available_cores()} core(s), torch {torch.__version__},"
          f" {torch.get_num_threads()} threads")
    peak = sgemm_peak_gflops()
    print(f"sgemm peak: {peak:.1f} GFLOP/s")
    fmnist = "fashion-mnist"
    try:
        load_task(build_config(None, {"dataset": fmnist}), PluginHost.discover())
    except Exception:
        fmnist = "digits"
    print(f"data: {fmnist}, {EPOCHS} epochs per loop (samples: at most {SAMPLES:,}, fewer for"
          f" larger models), the median of {ROUNDS} measurements of each loop")
    works = [workload(name, fmnist, size)
             for name, size in (("smallcnn", None), ("vgg11", 32), ("resnet18", 32))]
    # with the C library's defaults, as a script runs it
    plain = [statistics.median(plain_rate(work) for _ in range(ROUNDS)) for work in works]
    retain_freed_memory()  # what a search process sets (autoshrink.allocator)
    header = (f"{'model':<9} {'input':>8} {'MACs':>12} {'samples':>8} {'plain/s':>8}"
              f" {'+alloc/s':>8} {'float32/s':>9} {'speed-up':>8} {'default/s':>9}"
              f" {'precision':>9} {'speed-up':>8} {'GFLOP/s':>8} {'of peak':>8}")
    print(header)
    for work, plain_default in zip(works, plain):
        rounds = [(plain_rate(work), trainer_rate(work, "float32")[0], *trainer_rate(work, "auto"))
                  for _ in range(ROUNDS)]
        kept_rates, float32_rates, default_rates, bfloat16_flags = zip(*rounds)
        plain_kept, float32, default = map(statistics.median,
                                           (kept_rates, float32_rates, default_rates))
        bfloat16 = bfloat16_flags[0]  # decided once per process (autoshrink.train)
        gflops = default * 6 * work.macs / 1e9
        print(f"{work.model_name:<9} {'x'.join(map(str, work.task.input_shape)):>8}"
              f" {work.macs:>12,} {work.samples:>8,} {plain_default:>8.0f} {plain_kept:>8.0f}"
              f" {float32:>9.0f} {float32 / plain_default:>7.2f}x {default:>9.0f}"
              f" {'bfloat16' if bfloat16 else 'float32':>9} {default / plain_default:>7.2f}x"
              f" {gflops:>8.1f} {gflops / peak:>7.0%}")
    print("plain: the plain loop with the C library's memory settings, as a script runs it;"
          " +alloc: the same loop with the search process's (freed memory kept for reuse);"
          " float32: our trainer held to float32; default: its default precision (auto), which"
          " trains in bf16 where this CPU measured it faster, for models of 1M MACs or more;"
          " speed-ups against the plain loop; GFLOP/s and peak share are the default's,"
          " against float32 sgemm")


if __name__ == "__main__":
    main()
