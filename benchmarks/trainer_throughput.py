"""Trainer throughput against a plain DataLoader + NCHW loop, and against the machine's peak.

Both loops train the same model on the same data with the same optimizer and schedule; the
plain loop is what most training scripts do (``DataLoader(TensorDataset(...), shuffle=True)``,
NCHW tensors). Effective GFLOP/s counts 6 FLOPs per MAC per sample (forward 2, backward about
4, the usual estimate); the peak is float32 matrix multiplication (sgemm) measured in the same
run. Run: ``python -m benchmarks.trainer_throughput`` (Fashion-MNIST when installed, else
digits).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from autoshrink.config import build_config
from autoshrink.metrics import count_macs
from autoshrink.plugins import PluginHost
from autoshrink.task import load_task
from autoshrink.train import Recipe, Trainer, available_cores, configure_threads

SAMPLES = 12_288  # per measured epoch: the same subset for both loops


def sgemm_peak_gflops(n: int = 2048, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


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
    n = min(SAMPLES, len(train))
    subset = type(task.splits)(type(train)(train.x[:n], train.y[:n]), task.splits.val,
                               task.splits.test, task.splits.num_classes)
    macs = count_macs(task.build_model(), task.input_shape)
    results = {}
    for name in ("plain", "autoshrink"):
        model = task.build_model()
        start = time.perf_counter()
        if name == "plain":
            plain_loop(model, subset.train.x, subset.train.y, task.recipe, epochs)
        else:
            Trainer(subset, task.recipe).fit(model, epochs=epochs, lr=task.recipe.lr)
        seconds = time.perf_counter() - start
        results[name] = n * epochs / seconds
    return {"model": model_name, "input": "x".join(map(str, task.input_shape)), "macs": macs,
            "plain": results["plain"], "ours": results["autoshrink"]}


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
    print(f"data: {fmnist}, {SAMPLES} training samples per epoch, 2 epochs per loop")
    header = (f"{'model':<9} {'input':>8} {'MACs':>12} {'plain/s':>9} {'ours/s':>9}"
              f" {'speed-up':>8} {'GFLOP/s':>8} {'of peak':>8}")
    print(header)
    for model_name, size in (("smallcnn", None), ("vgg11", 32), ("resnet18", 32)):
        row = measure(model_name, fmnist, size)
        gflops = row["ours"] * 6 * row["macs"] / 1e9
        print(f"{row['model']:<9} {row['input']:>8} {row['macs']:>12,} {row['plain']:>9.0f}"
              f" {row['ours']:>9.0f} {row['ours'] / row['plain']:>7.2f}x {gflops:>8.1f}"
              f" {gflops / peak:>7.0%}")


if __name__ == "__main__":
    main()
