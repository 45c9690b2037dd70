"""How much weight inheritance saves: each inheriting rewrite, from the trained baseline versus
from scratch, on the default task (digits, smallcnn).

For every architecture technique that inherits weights and applies to the model, three runs:
  inherit  - rewrite the trained baseline, fine-tune ``finetune_epochs`` (what a trial does);
  scratch  - rewrite a fresh model, train the full ``epochs``;
  short    - rewrite a fresh model, train only ``finetune_epochs`` (the same budget as inherit).
Prints validation accuracy and seconds of each, and the ratios, from one run.

    python -m benchmarks.weight_inheritance
"""

from __future__ import annotations

import copy
import time

import torch

from autoshrink.search import trial_context
from autoshrink.technique import Stage
from autoshrink.train import Trainer
from benchmarks.common import prepare


def timed_fit(trainer: Trainer, model, epochs: int, lr: float) -> tuple[float, float]:
    start = time.perf_counter()
    trainer.fit(model, epochs=epochs, lr=lr)
    return trainer.accuracy(model, trainer.splits.val), time.perf_counter() - start


def main() -> None:
    host, task, baseline, metrics, trainer = prepare()
    recipe = task.recipe
    ctx = trial_context(task, trainer, seed=0)
    print(f"baseline val acc {metrics.val_accuracy * 100:.2f}%; fine-tune {recipe.finetune_epochs}"
          f" epochs at lr {recipe.finetune_lr}, full training {recipe.epochs} epochs at lr"
          f" {recipe.lr}")
    print(f"{'technique':<18} {'inherit':>14} {'scratch':>14} {'short':>14}"
          f" {'time saved':>10} {'acc gain at equal time':>22}")
    for name, technique in sorted(host.techniques.items()):
        if technique.stage is not Stage.ARCHITECTURE or not technique.inherits_weights:
            continue
        if not technique.applies_to(baseline)[0]:
            continue
        options = technique.Options()
        inherited = technique.apply(copy.deepcopy(baseline), options, ctx)
        acc_i, sec_i = timed_fit(trainer, inherited, recipe.finetune_epochs, recipe.finetune_lr)
        torch.manual_seed(task.seed + 1)
        fresh = technique.apply(task.build_model(), options, ctx)
        short = copy.deepcopy(fresh)
        acc_s, sec_s = timed_fit(trainer, fresh, recipe.epochs, recipe.lr)
        acc_q, sec_q = timed_fit(trainer, short, recipe.finetune_epochs, recipe.lr)
        print(f"{name:<18} {acc_i * 100:6.2f}% {sec_i:5.1f}s {acc_s * 100:6.2f}% {sec_s:5.1f}s"
              f" {acc_q * 100:6.2f}% {sec_q:5.1f}s {sec_s / sec_i:9.2f}x"
              f" {(acc_i - acc_q) * 100:+20.2f} pp")


if __name__ == "__main__":
    main()
