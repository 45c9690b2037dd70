"""``autoshrink search``: run (or resume) a compression search and print its Pareto fronts."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from autoshrink.cli.common import (
    add_plugin_argument,
    add_task_arguments,
    discover_plugins,
    print_json,
    split_list,
    task_overrides,
)
from autoshrink.config import (
    SAMPLERS,
    TRIALS_PER_WORKER,
    SearchConfig,
    build_config,
    lengths_text,
    parse_fixed_options,
)
from autoshrink.errors import TrialsKeepFailing
from autoshrink.recipe import PRECISIONS
from autoshrink.standby import can_fork_workers, standby_workers

if TYPE_CHECKING:
    import optuna

    from autoshrink.plugins import PluginHost

log = logging.getLogger(__name__)


def add_parser(verbs) -> None:
    parser = verbs.add_parser("search", help="run or resume a search",
                              description="Run (or resume) a multi-objective compression search.")
    add_task_arguments(parser)
    group = parser.add_argument_group("search")
    group.add_argument("--max-drop", type=float,
                       help="accuracy budget in percentage points below the baseline (default 5)")
    group.add_argument("--objectives", help="cost objectives: params,flops,size (default params)")
    group.add_argument("--n-trials", type=int,
                       help="total finished trials the study should hold"
                       f" (default {SearchConfig.n_trials})")
    group.add_argument("--n-jobs", type=int,
                       help="processes running trials side by side (this one and N-1 workers),"
                       " the cores split between them (default: one per core once each gets"
                       f" {TRIALS_PER_WORKER} trials, else 1)")
    group.add_argument("--sampler", choices=SAMPLERS,
                       help="Optuna sampler (default tpe; random for comparisons)")
    group.add_argument("--no-early-abort", dest="early_abort", action="store_false",
                       default=None, help="train every trial to the end, even when it cannot"
                                          " meet the budget")
    group.add_argument("--proxy-data", type=float, metavar="SHARE",
                       help="search on this share of the training data, then confirm the"
                            " Pareto candidates on all of it")
    group.add_argument("--proxy-epochs", type=float, metavar="SHARE",
                       help="search with this share of the epochs, then confirm at full length")
    group.add_argument("--proxy-max-drop", type=float, metavar="PP",
                       help="the budget proxy trials must meet, below the proxy's own baseline"
                            " (default: --max-drop); a proxy's drops can understate the full"
                            " task's, so a tighter one keeps more candidates inside --max-drop"
                            " when confirmed")
    group.add_argument("--training-lengths", metavar="SHARES",
                       help="shares of --epochs / --finetune-epochs a trial may train for,"
                            " chosen per trial by the sampler as a cheaper, lower fidelity"
                            f" (default {lengths_text(SearchConfig.training_lengths)}; add 1 to"
                            " offer the full length, 1 alone: always it)")
    group.add_argument("--timeout", type=float, help="stop starting new trials after SECONDS")
    group.add_argument("--techniques", help="only these techniques (comma-separated)")
    group.add_argument("--exclude", help="never these techniques (comma-separated)")
    group.add_argument("--set", action="append", default=[], dest="fixed",
                       metavar="TECH:OPTION=VALUE",
                       help="hold a technique's option at VALUE instead of searching it"
                            " (repeatable), e.g. --set distill:temperature=4")
    group.add_argument("--start-plan", action="append", dest="start_plans", metavar="PLAN",
                       help="measure this plan first, written as reports print it (repeatable;"
                            " replaces the preset's start_plans), e.g. --start-plan"
                            " 'gap-classifier + prune-l1(amount=0.5, steps=3)'")
    group.add_argument("--epochs", type=int, help="baseline training epochs")
    group.add_argument("--finetune-epochs", type=int,
                       help="fine-tuning epochs of a rewritten model that inherits the"
                            " baseline's weights, and of techniques that ask for the recipe's")
    group.add_argument("--input-size", type=int, help="resize images to SIZE x SIZE")
    group.add_argument("--precision", choices=PRECISIONS,
                       help="of training (default auto: bfloat16 on CUDA, and on a CPU where it"
                            " measures faster and the model has 1M MACs or more; evaluation is"
                            " always float32)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_plugin_argument(parser)
    parser.set_defaults(run=run, trains=True)  # restarts under tcmalloc (autoshrink.allocator)


def run(args) -> int:
    overrides = task_overrides(args) | {
        "max_drop": args.max_drop, "objectives": split_list(args.objectives, "--objectives"),
        "n_trials": args.n_trials, "n_jobs": args.n_jobs, "timeout": args.timeout,
        "sampler": args.sampler, "early_abort": args.early_abort,
        "proxy_data": args.proxy_data, "proxy_epochs": args.proxy_epochs,
        "proxy_max_drop": args.proxy_max_drop,
        "training_lengths": args.training_lengths,
        "techniques": split_list(args.techniques, "--techniques"),
        "exclude": split_list(args.exclude, "--exclude"),
        "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
        "input_size": args.input_size, "precision": args.precision,
        "fixed_options": parse_fixed_options(args.fixed),
        "start_plans": args.start_plans,  # None unless given: the preset's then stand
    }
    config = build_config(args.study, overrides)
    # workers forked once this process has imported the libraries share them with it; spawned
    # ones import them alongside it (autoshrink.standby)
    fork = can_fork_workers()
    loaded = load_search_to_share(args, config) if fork else None
    with standby_workers(config.workers - 1, fork=fork) as standby:
        search_class, host = loaded or load_search(args)
        search = search_class(config, host, standby=standby)
        study = search.run()
    # the reports' libraries (pandas, matplotlib) load only once there is something to report,
    # so a name typed wrong is refused without them
    from autoshrink.cli.results import finish

    payload = finish(study, config, search.task, host, args.json,
                     weak_baseline_said=search.warned_weak_baseline)
    if search.gave_up:  # reported above; nothing worth confirming, and an exit code that says so
        if args.json:
            print_json(payload)
        raise TrialsKeepFailing(search.gave_up)
    if config.is_proxy:
        payload["confirmation"] = confirm_and_compare(study, config, host, args.json)
    if args.json:
        print_json(payload)
    return 0


def load_search(args) -> tuple[type, PluginHost]:
    """The search's libraries, which the parser does not load (autoshrink.cli): its class, and
    the plugins, a broken one warned of."""
    from autoshrink.search import Search

    host = discover_plugins(args)
    for broken in host.broken:
        log.warning(f"warning: plugin {broken.plugin!r} ({broken.distribution}) skipped:"
                    f" {broken.error}")
    return Search, host


def load_search_to_share(args, config: SearchConfig) -> tuple[type, PluginHost]:
    """``load_search``, and the rest that workers forked from this process are to share:
    scikit-learn's splitting, which loading the task imports (autoshrink.data). The names are
    checked first, so that a name typed wrong is refused without it."""
    from autoshrink.search import check_names

    loaded = load_search(args)
    check_names(config, loaded[1])
    import sklearn.model_selection  # noqa: F401

    return loaded


def confirm_and_compare(proxy: optuna.Study, config: SearchConfig, host,
                        as_json: bool) -> dict | None:
    """The full-scale re-run of a proxy search's candidates, reported beside the proxy."""
    # imported here, not with the module, so the parser loads no torch (autoshrink.cli)
    import pandas as pd

    from autoshrink.cli.results import finish
    from autoshrink.confirm import comparison, confirm
    from autoshrink.report import text_table

    confirmed = confirm(proxy, config, host)
    if confirmed is None:
        return None
    study, full, task = confirmed
    if not as_json:
        print("\n=== confirmed on the full task ===")
    payload = finish(study, full, task, host, as_json)
    rows = comparison(proxy, study)
    path = config.run_dir / "confirmation.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    if not as_json:
        print("\nproxy vs confirmed (validation accuracy drop, pp; test accuracy is measured"
              " for models on the confirmed fronts):")
        print(text_table(pd.DataFrame(rows), "plan", na_rep="-"))
    log.info(f"wrote {path}")
    return payload | {"candidates": rows}
