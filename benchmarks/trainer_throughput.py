"""Trainer throughput against a plain DataLoader + NCHW loop, and against the machine's peak.

Both loops train the same model on the same data with the same optimizer and schedule; the
plain loop is what most training scripts do (``DataLoader(TensorDataset(...), shuffle=True)``,
NCHW tensors, float32). Ours runs twice: held to float32, and at its default precision (bf16
autocast where the CPU measured it faster, see ``autoshrink.train``). Effective GFLOP/s counts
6 FLOPs per MAC per sample (forward 2, backward about 4, the usual estimate); the peak is
float32 matrix multiplication (sgemm) measured in the same run. Run: ``python -m
benchmarks.trainer_throughput`` (Fashion-MNIST when installed, else digits).
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from autoshrink.config import build_config
from autoshrink.metrics import count_macs
from autoshrink.plugins import PluginHost
from autoshrink.task import load_task
from autoshrink.train import Recipe, Trainer, available_cores, configure_threads

SAMPLES = 12_288  # at most, per measured epoch: the same subset for both loops
WORK = 1.5e12  # training FLOPs per loop and epoch: fewer samples for larger models


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


def measure(model_name: str, dataset: str, input_size: int | None, epochs: int = 2) -> dict:
    host = PluginHost.discover()
    config = build_config(None, {"model": model_name, "dataset": dataset,
                                 "input_size": input_size})
    task = load_task(config, host)
    train = task.splits.train
    macs = count_macs(task.build_model(), task.input_shape)
    n = int(min(SAMPLES, len(train), WORK / (6 * macs)) // 64 * 64)
    subset = dataclasses.replace(task.splits, train=type(train)(train.x[:n], train.y[:n]))
    results = {}
    for name in ("plain", "float32", "auto"):
        model = task.build_model()
        if name == "plain":
            start = time.perf_counter()
            plain_loop(model, subset.train.x, subset.train.y, task.recipe, epochs)
        else:  # the trainer's speed check, once per process, is not part of the training
            trainer = Trainer(subset, dataclasses.replace(task.recipe, precision=name),
                              task_macs=macs)
            if name == "auto":
                results["precision"] = "bfloat16" if trainer.bfloat16 else "float32"
            start = time.perf_counter()
            trainer.fit(model, epochs=epochs, lr=task.recipe.lr)
        results[name] = n * epochs / (time.perf_counter() - start)
    return {"model": model_name, "input": "x".join(map(str, task.input_shape)), "macs": macs,
            "samples": n, **results}


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
    print(f"data: {fmnist}, 2 epochs per loop (samples: at most {SAMPLES:,}, fewer for larger"
          " models)")
    header = (f"{'model':<9} {'input':>8} {'MACs':>12} {'samples':>8} {'plain/s':>8}"
              f" {'float32/s':>9} {'speed-up':>8} {'default/s':>9} {'precision':>9}"
              f" {'speed-up':>8} {'GFLOP/s':>8} {'of peak':>8}")
    print(header)
    for model_name, size in (("smallcnn", None), ("vgg11", 32), ("resnet18", 32)):
        row = measure(model_name, fmnist, size)
        gflops = row["auto"] * 6 * row["macs"] / 1e9
        print(f"{row['model']:<9} {row['input']:>8} {row['macs']:>12,} {row['samples']:>8,}"
              f" {row['plain']:>8.0f} {row['float32']:>9.0f}"
              f" {row['float32'] / row['plain']:>7.2f}x {row['auto']:>9.0f}"
              f" {row['precision']:>9} {row['auto'] / row['plain']:>7.2f}x {gflops:>8.1f}"
              f" {gflops / peak:>7.0%}")
    print("float32: the trainer held to float32; default: its default precision (auto), which"
          " trains in bf16 where this CPU measured it faster, for models of 1M MACs or more;"
          " GFLOP/s and peak share are the default's, against float32 sgemm")


if __name__ == "__main__":
    main()
