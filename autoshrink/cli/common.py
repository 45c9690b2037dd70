"""Options and output helpers shared by several verbs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from autoshrink.config import RUN_FOLDER_MARK, SearchConfig, build_config, config_from_json
from autoshrink.errors import UsageError

if TYPE_CHECKING:
    import optuna

    from autoshrink.plugins import PluginHost


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that name a task and its study; None means 'from the preset or default'."""
    group = parser.add_argument_group("task and study")
    group.add_argument("--study", metavar="PRESET",
                       help="a TOML preset from studies/ (name or path); flags override it")
    group.add_argument("--model", help="model name or package.module:callable (default smallcnn)")
    group.add_argument("--dataset", help="dataset name (default digits)")
    group.add_argument("--data-dir", help="folder holding the dataset's files")
    group.add_argument("--study-name", help="study name (default <dataset>-<model>)")
    group.add_argument("--storage", help="Optuna storage URL (default sqlite in the run folder)")
    group.add_argument("--out", help="run folder (default runs/<study-name>)")
    group.add_argument("--seed", type=int, help="seed of the data split, training and sampler")


def task_overrides(args: argparse.Namespace) -> dict:
    return {"model": args.model, "dataset": args.dataset, "data_dir": args.data_dir,
            "study_name": args.study_name, "storage": args.storage, "out": args.out,
            "seed": args.seed}


def print_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose``, on every verb."""
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                          default=0, help="no progress, only warnings and results")
    loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                          help="also per-epoch and per-trial detail")


def split_list(text: str | None, flag: str) -> tuple[str, ...] | None:
    """A comma list given as ``flag``; None when not given. An empty one is refused, as an
    empty --techniques would otherwise read as its default, every technique."""
    if text is None:
        return None
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    if not parts:
        raise UsageError(f"{flag} {text!r} names nothing; name at least one, or leave {flag} out")
    return parts


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE|FILE.py",
                        help="also load this plugin module or file (repeatable); otherwise"
                             " only installed entry points are loaded")


def discover_plugins(args: argparse.Namespace) -> PluginHost:
    # imported here, not with the module, so the parser loads no torch (autoshrink.cli)
    from autoshrink.plugins import PluginHost

    return PluginHost.discover(explicit=tuple(args.plugin))


def open_existing_study(args: argparse.Namespace,
                        max_drop: float | None = None) -> tuple[optuna.Study, SearchConfig]:
    """The study the task flags point at, and the settings it was created with (run folder,
    storage and ``max_drop`` as given now)."""
    located = build_config(args.study, task_overrides(args))
    # imported here, not with the module, so the parser loads no torch (autoshrink.cli)
    import optuna

    from autoshrink.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if located.storage is None and not (located.run_dir / "study.db").exists():
        _refuse_a_folder_without_its_study(located.run_dir)
    storage = open_storage(located.storage_url)
    name = _stored_study_name(args, located, optuna.get_all_study_names(storage))
    study = optuna.load_study(study_name=name, storage=storage)
    stored = study.user_attrs["config"]
    run_dir = located.run_dir
    searched_in = config_from_json(stored).run_dir
    if args.out is None and located.storage is not None and searched_in.is_dir():
        run_dir = searched_in  # where its search wrote the models, not runs/<study name>
    overrides = {"out": str(run_dir), "storage": located.storage}
    if max_drop is not None:  # the budget to report at, for a proxy study too
        overrides |= {"max_drop": max_drop, "proxy_max_drop": None}
    return study, config_from_json(stored, **overrides)


def _refuse_a_folder_without_its_study(run_dir: Path) -> None:
    mark = run_dir / RUN_FOLDER_MARK
    if mark.is_file():  # searched with --storage: the study is kept elsewhere
        raise UsageError(f"{str(run_dir)!r} holds the files of study"
                         f" {mark.read_text().strip()!r}, whose storage is elsewhere (its search"
                         " was given --storage); pass the same --storage")
    raise UsageError(f"no study in {str(run_dir)!r}; run 'autoshrink search' first"
                     " or point --out / --study-name / --storage at an existing study")


def _stored_study_name(args: argparse.Namespace, located: SearchConfig,
                       names: list[str]) -> str:
    """Of the storage's study ``names``, the one the task flags give, or, when none of them
    was given and the storage holds one study, that study's (``--out runs/x`` after a search of
    another model); the rest of the settings come from the study itself."""
    if located.name in names:
        return located.name
    named = args.study or args.model or args.dataset or args.study_name
    if len(names) == 1 and not named:
        return names[0]
    held = ", ".join(repr(n) for n in names) or "no study"
    raise UsageError(f"study {located.name!r} is not in {located.storage_url}, which holds"
                     f" {held}; pass --study-name, or the --model and --dataset of its search")
