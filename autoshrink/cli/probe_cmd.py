"""``autoshrink probe``: estimate the redundant share of a dataset's input (seed 001)."""

from __future__ import annotations

import dataclasses
import json
import logging
from fractions import Fraction

from autoshrink.cli.common import (
    add_plugin_argument,
    discover_plugins,
    print_json,
)
from autoshrink.config import build_config

log = logging.getLogger(__name__)
REDUNDANCY_OPTION = "redundancy"  # techniques with an option of this name take the estimate


def add_parser(verbs) -> None:
    parser = verbs.add_parser(
        "probe", help="estimate how redundant a dataset's images are",
        description="Train the model on distorted images (stage 1) and with masked input"
                    " convolutions (stage 2) over k folds, and estimate the share of the input"
                    " that can be dropped without hurting accuracy (seed 001).")
    parser.add_argument("--study", metavar="PRESET", help="a TOML preset (model, dataset...)")
    parser.add_argument("--model", help="model name or package.module:callable (default"
                                        " smallcnn)")
    parser.add_argument("--dataset", help="dataset name (default digits)")
    parser.add_argument("--data-dir", help="folder holding the dataset's files")
    parser.add_argument("--input-size", type=int, help="resize images to SIZE x SIZE")
    parser.add_argument("--seed", type=int, help="seed of the folds and the training")
    parser.add_argument("--out", help="folder for probe.json (default runs/<dataset>-<model>)")
    parser.add_argument("--folds", type=int, default=3, help="k of the k-fold comparison"
                                                             " (default 3, as in the paper)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per variant"
                                                               " and fold (default 10)")
    parser.add_argument("--gamma", type=float, default=0.5,
                        help="focal loss gamma (default 0.5, as in the paper)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_plugin_argument(parser)
    parser.set_defaults(run=run, trains=True)  # restarts under tcmalloc (autoshrink.allocator)


def run(args) -> int:
    config = build_config(args.study, {
        "model": args.model, "dataset": args.dataset, "data_dir": args.data_dir,
        "input_size": args.input_size, "seed": args.seed, "out": args.out})
    # imported here, not with the module, so the parser loads no torch (autoshrink.cli)
    import pandas as pd

    from autoshrink.probe import check_options, probe
    from autoshrink.task import load_task
    from autoshrink.train import configure_process

    check_options(args.folds, args.epochs, args.gamma)
    host = discover_plugins(args)
    configure_process()
    task = load_task(config, host)
    masked_task = load_task(dataclasses.replace(config, input_size=2 * task.input_shape[1]),
                            host)
    result = probe(task, masked_task, folds=args.folds, epochs=args.epochs, gamma=args.gamma)
    takers = sorted(name for name, technique in host.techniques.items()
                    if REDUNDANCY_OPTION in {f.name for f in dataclasses.fields(
                        technique.Options)})
    payload = {"dataset": config.dataset, "model": task.model_spec.name,
               "folds": args.folds, "epochs": args.epochs, "gamma": args.gamma,
               "redundancy_found": result.redundancy_found, "fraction": result.fraction,
               "reason": result.reason, "variants": result.rows(),
               "folds_detail": [{"stage": v.stage, "variant": v.variant, **v.folds}
                                for v in result.variants],
               "use_with": [f"--set {name}:{REDUNDANCY_OPTION}={result.fraction:g}"
                            for name in takers] if result.fraction else []}
    config.run_dir.mkdir(parents=True, exist_ok=True)
    path = config.run_dir / "probe.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if args.json:
        print_json(payload)
        return 0
    table = pd.DataFrame(result.rows())
    for stage, title in ((1, "stage 1: tiled images vs DN"),
                         (2, "stage 2: masked stride-2 input convolution vs 111111111")):
        print(f"\n{title} (means over {args.folds} held-out folds)")
        print(table[table.stage == stage].drop(columns="stage").to_string(index=False))
    print(f"\nestimated redundant fraction: {Fraction(result.fraction).limit_denominator(4)}"
          f" ({result.reason})")
    for option in payload["use_with"]:
        print(f"  use it in a search: autoshrink search {option}")
    log.info(f"wrote {path}")
    return 0
