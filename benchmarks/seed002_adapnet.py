"""Seed 002's Tables 3-6 here: a network trained with AdapNet, reported as the paper does
(train / top-1 / top-2 accuracy, prune ratio, epochs of the structure phase).

    python -m benchmarks.seed002_adapnet [--model vgg11] [--dataset digits] [--input-size 32]

The network is first trained as usual (the search's cached baseline: our startup phase), then
AdapNet's structure evaluation and change phase runs until its stopping rule, then the result is
fine-tuned. The prune ratio is the share of parameters removed, of all of them and of the
convolutions' (AdapNet never touches the classifier, which holds most of VGG's weights).
The paper (CIFAR-10, 50 startup + 10 fine-tune epochs): VGG11 87 % pruned, 93 / 88 / 92 %
train / top-1 / top-2, 53 epochs; Net2 88 %, 82 / 69 / 84 %, 50 epochs.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from autoshrink.metrics import count_params
from autoshrink.search import trial_context
from autoshrink_plugins.adapnet import AdapNetOptions, AdapNetRun
from benchmarks.common import prepare

PAPER = {"vgg11": "87 % pruned, train 93 %, top-1 88 %, top-2 92 %, 53 structure epochs"}


@torch.no_grad()
def top_k(model, split, k: int) -> float:
    model.eval()
    logits = torch.cat([model(split.x[i:i + 512]) for i in range(0, len(split), 512)])
    return (logits.topk(k, 1).indices == split.y[:, None]).any(1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=15, help="startup (baseline) epochs")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--lsep", type=int, default=20)
    parser.add_argument("--max-periods", type=int, default=30)
    args = parser.parse_args()
    host, task, base, metrics, trainer = prepare(dataset=args.dataset, model=args.model,
                                                 epochs=args.epochs,
                                                 input_size=args.input_size)
    ctx = trial_context(task, trainer, seed=0)
    model = copy.deepcopy(base)
    start = time.perf_counter()
    run = AdapNetRun(model, AdapNetOptions(lsep=args.lsep, max_periods=args.max_periods), ctx)
    log = run.run()
    structure_seconds = time.perf_counter() - start
    for period in log:
        print(f"  LSEP {period.period:>2}: removed {period.removed:>3}, frozen {period.frozen:>3},"
              f" merged {period.merged:>3}, inserted {period.inserted}")
    trainer.fit(model, epochs=args.finetune_epochs, lr=task.recipe.finetune_lr)
    structure_epochs = run.batches_done / ctx.batches_per_epoch
    before, after = count_params(base)[0], count_params(model)[0]
    conv_before, conv_after = (sum(m.weight.numel() for m in net.modules()
                                   if isinstance(m, torch.nn.Conv2d)) for net in (base, model))
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    print(f"{args.model} on {args.dataset}: convolution widths after AdapNet {widths}")
    print(f"{'':<18}{'baseline':>10}{'AdapNet':>10}")
    print(f"{'train acc %':<18}{trainer.accuracy(base, task.splits.train) * 100:10.1f}"
          f"{trainer.accuracy(model, task.splits.train) * 100:10.1f}")
    print(f"{'top-1 test %':<18}{top_k(base, task.splits.test, 1) * 100:10.1f}"
          f"{top_k(model, task.splits.test, 1) * 100:10.1f}")
    print(f"{'top-2 test %':<18}{top_k(base, task.splits.test, 2) * 100:10.1f}"
          f"{top_k(model, task.splits.test, 2) * 100:10.1f}")
    print(f"{'params':<18}{before:10,}{after:10,}")
    print(f"prune ratio {100 * (1 - after / before):.1f} % of all parameters,"
          f" {100 * (1 - conv_after / conv_before):.1f} % of the convolution weights")
    print(f"structure phase"
          f" {structure_epochs:.1f} epochs ({structure_seconds:.0f} s), startup {args.epochs},"
          f" fine-tune {args.finetune_epochs} epochs")
    if args.model in PAPER:
        print(f"paper ({args.model}, CIFAR-10): {PAPER[args.model]}")


if __name__ == "__main__":
    main()
