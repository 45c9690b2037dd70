"""Options and output helpers shared by several verbs."""

from __future__ import annotations

import argparse
import json
import sys

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


def echo_to_stderr(quiet: bool):
    def echo(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)
    return echo


def split_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE|FILE.py",
                        help="also load this plugin module or file (repeatable); otherwise"
                             " only installed entry points are loaded")


def discover_plugins(args: argparse.Namespace) -> PluginHost:
    return PluginHost.discover(explicit=tuple(args.plugin))
