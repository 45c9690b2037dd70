"""``autoshrink search``: run (or resume) a compression search and print its Pareto fronts."""

from __future__ import annotations

from autoshrink.cli.common import (
    add_plugin_argument,
    add_task_arguments,
    discover_plugins,
    echo_to_stderr,
    split_list,
    task_overrides,
)
from autoshrink.cli.results import finish
from autoshrink.config import build_config
from autoshrink.search import Search


def add_parser(verbs) -> None:
    parser = verbs.add_parser("search", help="run or resume a search",
                              description="Run (or resume) a multi-objective compression search.")
    add_task_arguments(parser)
    group = parser.add_argument_group("search")
    group.add_argument("--max-drop", type=float,
                       help="accuracy budget in percentage points below the baseline (default 5)")
    group.add_argument("--objectives", help="cost objectives: params,flops,size (default params)")
    group.add_argument("--n-trials", type=int,
                       help="total finished trials the study should hold (default 24)")
    group.add_argument("--n-jobs", type=int,
                       help="worker processes running trials side by side (default 1)")
    group.add_argument("--sampler", choices=("tpe", "random"),
                       help="Optuna sampler (default tpe; random for comparisons)")
    group.add_argument("--no-early-abort", dest="early_abort", action="store_false",
                       default=None, help="train every trial to the end, even when it cannot"
                                          " meet the budget")
    group.add_argument("--timeout", type=float, help="stop starting new trials after SECONDS")
    group.add_argument("--techniques", help="only these techniques (comma-separated)")
    group.add_argument("--exclude", help="never these techniques (comma-separated)")
    group.add_argument("--epochs", type=int, help="baseline training epochs")
    group.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs after rewrites")
    group.add_argument("--input-size", type=int, help="resize images to SIZE x SIZE")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_plugin_argument(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    overrides = task_overrides(args) | {
        "max_drop": args.max_drop, "objectives": split_list(args.objectives),
        "n_trials": args.n_trials, "n_jobs": args.n_jobs, "timeout": args.timeout,
        "sampler": args.sampler, "early_abort": args.early_abort,
        "techniques": split_list(args.techniques), "exclude": split_list(args.exclude),
        "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
        "input_size": args.input_size,
    }
    config = build_config(args.study, overrides)
    host = discover_plugins(args)
    echo = echo_to_stderr(args.quiet)
    for broken in host.broken:
        echo(f"warning: plugin {broken.plugin!r} ({broken.distribution}) skipped: {broken.error}")
    search = Search(config, host, echo)
    study = search.run()
    return finish(study, config, search.task, host, config.max_drop, args.json, echo)
