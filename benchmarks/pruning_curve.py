"""Seed 003's Table III on a model and dataset that run here: iterative L1 pruning, amount 0.2
of the surviving weights per step, fine-tuned after each step, accuracy at each sparsity.

    python benchmarks/pruning_curve.py [--dataset fashion-mnist] [--steps 10]

Prints sparsity, non-zero parameters, test accuracy and the drop, next to the paper's ResNet-101 /
CIFAR-100 baseline column, whose shape (flat to ~50 %, then falling faster) is what we compare.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from autoshrink import artifact
from autoshrink.metrics import count_params
from autoshrink.search import trial_context
from benchmarks.common import prepare

PAPER = [(0.0, 67.51), (20.0, 67.44), (35.9, 66.76), (48.7, 65.73), (58.9, 65.52), (67.1, 64.53),
         (73.7, 63.37), (78.9, 61.34), (83.1, 59.69), (86.5, 56.39), (89.1, 53.46)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    host, task, model, metrics, trainer = prepare(dataset=args.dataset, model=args.model,
                                                  epochs=args.epochs)
    prune = host.technique("prune-l1")

    ctx = trial_context(task, trainer, seed=0)
    total = count_params(model)[0]
    base_acc = trainer.accuracy(model, task.splits.test) * 100
    folder = Path(tempfile.mkdtemp())
    print(f"{args.model} on {args.dataset}: {total:,} params, test acc {base_acc:.2f}%")
    print(f"{'step':>4} {'sparsity %':>10} {'non-zero':>10} {'test acc %':>10} {'drop pp':>8}"
          f" {'bytes':>9} | paper sparsity %, acc %, drop pp")
    current = copy.deepcopy(model)
    for step in range(args.steps + 1):
        if step:
            current = prune.apply(current, prune.Options(amount=0.2, steps=1,
                                                         finetune_epochs=3, lr=1e-3), ctx)
        _, nonzero = count_params(current)
        acc = trainer.accuracy(current, task.splits.test) * 100
        size = artifact.save(current, folder / f"{step}.pt")
        paper = PAPER[step] if step < len(PAPER) else None
        reference = (f"{paper[0]:5.1f} {paper[1]:6.2f} {PAPER[0][1] - paper[1]:5.2f}"
                     if paper else "")
        print(f"{step:>4} {(1 - nonzero / total) * 100:10.1f} {nonzero:10,} {acc:10.2f}"
              f" {base_acc - acc:8.2f} {size:9,} | {reference}", flush=True)


if __name__ == "__main__":
    main()
