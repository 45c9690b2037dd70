"""``autoshrink report``: re-read a study and print its fronts, at any budget, without training."""

from __future__ import annotations

from autoshrink.cli.common import (
    add_plugin_argument,
    add_task_arguments,
    discover_plugins,
    open_existing_study,
    print_json,
)


def add_parser(verbs) -> None:
    parser = verbs.add_parser("report", help="print a finished study's Pareto fronts",
                              description="Re-read a study and print its Pareto fronts at a"
                                          " budget (default: the search's).")
    add_task_arguments(parser)
    parser.add_argument("--max-drop", type=float, help="budget in accuracy percentage points")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_plugin_argument(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    # imported here, not with the module, so the parser loads no torch (autoshrink.cli)
    from autoshrink.cli.results import finish
    from autoshrink.task import load_task

    study, config = open_existing_study(args, max_drop=args.max_drop)
    host = discover_plugins(args)
    task = load_task(config, host)
    payload = finish(study, config, task, host, args.json)
    if args.json:
        print_json(payload)
    return 0
