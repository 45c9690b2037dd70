"""The ``autoshrink`` command. The only place that turns errors into messages and exit codes.

Building the parser loads no torch: a verb module imports the libraries that train and measure
(torch, torchvision, scikit-learn, Optuna) inside the function that needs them, so ``--help``
and a mistyped flag answer at once instead of after the seconds those take to load.
"""

from __future__ import annotations

import argparse
import os
import sys

from autoshrink import __version__, progress
from autoshrink.allocator import restart_under_tcmalloc
from autoshrink.cli import (
    dashboard_cmd,
    export_cmd,
    inspect_cmd,
    plugins_cmd,
    probe_cmd,
    report_cmd,
    search_cmd,
)
from autoshrink.cli.common import add_output_arguments
from autoshrink.errors import AutoshrinkError, PluginError, UsageError
from autoshrink.termination import Terminated, sigterm_as_interrupt

VERBS = (search_cmd, report_cmd, export_cmd, dashboard_cmd, probe_cmd, inspect_cmd,
         plugins_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoshrink",
        description="Find how far a convolutional network can be shrunk under an accuracy budget.")
    parser.add_argument("--version", action="version", version=f"autoshrink {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_parser(verbs)
    for verb_parser in verbs.choices.values():
        add_output_arguments(verb_parser)
    return parser


def one_line(error: Exception) -> str:
    """Messages quoting library errors can span lines; the user gets exactly one."""
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress.configure(args.verbosity)
    try:
        if argv is None and getattr(args, "trains", False):  # as the program, not from Python
            restart_under_tcmalloc()
        with sigterm_as_interrupt():
            code = args.run(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not in Python's own flush at exit
        return code
    except (UsageError, PluginError) as error:
        print(f"autoshrink: error: {one_line(error)}", file=sys.stderr)
        return 2
    except AutoshrinkError as error:
        print(f"autoshrink: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        how = "stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted"
        print(f"autoshrink: {how}; finished trials are saved, re-run the same command to"
              " resume", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130  # 128 + the signal, as shells do
    except BrokenPipeError:  # the reader of our output (head, less) stopped reading
        # point stdout at nothing, so Python's flush at exit does not raise it again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command its pipe stopped


