"""Seed 000's Table 4 here: BaseNetwork vs ReducedNetwork, each with and without weight
quantization, grown by pyramid training on Fashion-MNIST (or any dataset) with the small CNN.

    python -m benchmarks.seed000_table4 [--dataset fashion-mnist] [--epochs 5]

Both networks are grown the paper's way (``pyramid``): Block 1 trained with its own FC head,
joined to Block 2, Block 2 trained on the frozen Block 1, then everything trained together.
BaseNetwork joins all 32 of Conv2's maps; ReducedNetwork merges them by cosine similarity to 16
(Table 3). The paper (CIFAR-10): 0.65 MB / 77.31 %, reduced 0.17 MB / 74.77 %, quantized
0.32 MB / 76.51 %, reduced + quantized 0.10 MB / 73.53 %. It does not say which quantization
Table 4 used (its size halves); we show 8-bit fixed point. The network trained whole (the
search's baseline) is printed for reference.
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
    parser.add_argument("--epochs", type=int, default=5,
                        help="epochs per block and for the combined training")
    args = parser.parse_args()
    host, task, whole, _, trainer = prepare(dataset=args.dataset, model="smallcnn",
                                            epochs=3 * args.epochs)
    ctx = trial_context(task, trainer, seed=0)
    pyramid, fixed = host.technique("pyramid"), host.technique("quantize-fixed-point")
    grown, seconds = {}, {}
    for name, reduction in (("BaseNetwork", 0.0), ("ReducedNetwork", 0.5)):
        start = time.perf_counter()
        options = pyramid.Options(reduction=reduction, block_epochs=args.epochs,
                                  variant="separate")
        model = pyramid.apply(task.build_model(), options, ctx)
        trainer.fit(model, epochs=args.epochs, lr=task.recipe.finetune_lr)  # combined
        grown[name], seconds[name] = model, time.perf_counter() - start
    variants = {
        "BaseNetwork": grown["BaseNetwork"],
        "ReducedNetwork": grown["ReducedNetwork"],
        "Quantization+BaseNetwork": fixed.apply(copy.deepcopy(grown["BaseNetwork"]),
                                                fixed.Options(bits=8), ctx),
        "Reduced+Quantization": fixed.apply(copy.deepcopy(grown["ReducedNetwork"]),
                                            fixed.Options(bits=8), ctx),
    }
    folder = Path(tempfile.mkdtemp())
    whole_size = artifact.save(whole, folder / "whole.pt")
    print(f"smallcnn on {args.dataset}, {len(task.splits.train)} training images; trained"
          f" whole: {whole_size:,} bytes,"
          f" test acc {trainer.accuracy(whole, task.splits.test) * 100:.2f} %")
    print(f"{'network':<26} {'bytes':>9} {'size x':>7} {'test acc %':>10} {'train s':>8}"
          f" | paper MB, size x, acc %")
    base_size = None
    for name, model in variants.items():
        size = artifact.save(model, folder / f"{name}.pt")
        base_size = base_size or size
        acc = trainer.accuracy(model, task.splits.test) * 100
        paper_mb, paper_acc = PAPER[name]
        train_s = seconds.get(name, seconds["ReducedNetwork" if "Reduced" in name
                                            else "BaseNetwork"])
        print(f"{name:<26} {size:9,} {base_size / size:7.2f} {acc:10.2f} {train_s:8.1f}"
              f" | {paper_mb:.2f} {PAPER['BaseNetwork'][0] / paper_mb:5.2f} {paper_acc:.2f}")


if __name__ == "__main__":
    main()
