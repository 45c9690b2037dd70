"""``autoshrink report``: re-read a study and print its fronts, at any budget, without training."""

from __future__ import annotations

import optuna

from autoshrink.cli.common import (
    add_plugin_argument,
    add_task_arguments,
    discover_plugins,
    echo_to_stderr,
    print_json,
    task_overrides,
)
from autoshrink.cli.results import finish
from autoshrink.config import build_config, config_from_json
from autoshrink.errors import UsageError
from autoshrink.storage import open_storage
from autoshrink.task import load_task


def add_parser(verbs) -> None:
    parser = verbs.add_parser("report", help="print a finished study's Pareto fronts",
                              description="Re-read a study and print its Pareto fronts at a"
                                          " budget (default: the search's).")
    add_task_arguments(parser)
    parser.add_argument("--max-drop", type=float, help="budget in accuracy percentage points")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_plugin_argument(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    located = build_config(args.study, task_overrides(args))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if located.storage is None and not (located.run_dir / "study.db").exists():
        raise UsageError(f"no study in {str(located.run_dir)!r}; run 'autoshrink search' first"
                         " or point --out / --study-name / --storage at an existing study")
    try:
        study = optuna.load_study(study_name=located.name,
                                  storage=open_storage(located.storage_url))
    except KeyError:
        raise UsageError(f"study {located.name!r} is not in {located.storage_url};"
                         " check --study-name") from None
    overrides = {"out": str(located.run_dir), "storage": located.storage}
    if args.max_drop is not None:
        overrides["max_drop"] = args.max_drop
    config = config_from_json(study.user_attrs["config"], **overrides)
    host = discover_plugins(args)
    task = load_task(config, host)
    payload = finish(study, config, task, host, config.max_drop, args.json,
                     echo_to_stderr(args.quiet))
    if args.json:
        print_json(payload)
    return 0


