"""Seed 000's Table 4 ratios here: BaseNetwork vs ReducedNetwork (feature-map merging), each
with and without weight quantization, on Fashion-MNIST with the small CNN.

    python benchmarks/seed000_table4.py [--dataset fashion-mnist]

The paper (CIFAR-10): 0.65 MB / 77.31 %, reduced 0.17 MB / 74.77 %, quantized 0.32 MB / 76.51 %,
reduced + quantized 0.10 MB / 73.53 %. Its reduction came from pyramid training with merging
between Conv2 and Conv3; here ``feature-merge`` merges similar maps in every layer of the
trained network (pyramid training itself is a training technique of its own). The paper does
not say which quantization Table 4 used (its size halves); we show 8-bit fixed point.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from autoshrink import artifact
from autoshrink.search import trial_context
from benchmarks.common import prepare

PAPER = {"BaseNetwork": (0.65, 77.31), "ReducedNetwork": (0.17, 74.77),
         "Quantization+BaseNetwork": (0.32, 76.51), "Reduced+Quantization": (0.10, 73.53)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.6)
    args = parser.parse_args()
    host, task, base, metrics, trainer = prepare(dataset=args.dataset, model="smallcnn",
                                                 epochs=args.epochs)

    ctx = trial_context(task, trainer, seed=0)
    merge, fixed = host.technique("feature-merge"), host.technique("quantize-fixed-point")
    start = time.perf_counter()
    reduced = merge.apply(copy.deepcopy(base), merge.Options(threshold=args.threshold,
                                                             reduction_scale=0.25), ctx)
    merge_seconds = time.perf_counter() - start
    variants = {
        "BaseNetwork": base,
        "ReducedNetwork": reduced,
        "Quantization+BaseNetwork": fixed.apply(copy.deepcopy(base), fixed.Options(bits=8), ctx),
        "Reduced+Quantization": fixed.apply(copy.deepcopy(reduced), fixed.Options(bits=8), ctx),
    }
    folder = Path(tempfile.mkdtemp())
    base_size = None
    print(f"smallcnn on {args.dataset}; merge + fine-tune took {merge_seconds:.1f}s")
    print(f"{'network':<26} {'bytes':>9} {'size x':>7} {'test acc %':>10}"
          f" | paper MB, size x, acc %")
    for name, model in variants.items():
        size = artifact.save(model, folder / f"{name}.pt")
        base_size = base_size or size
        acc = trainer.accuracy(model, task.splits.test) * 100
        paper_mb, paper_acc = PAPER[name]
        print(f"{name:<26} {size:9,} {base_size / size:7.2f} {acc:10.2f}"
              f" | {paper_mb:.2f} {PAPER['BaseNetwork'][0] / paper_mb:5.2f} {paper_acc:.2f}")


if __name__ == "__main__":
    main()
