"""``autoshrink dashboard``: optuna-dashboard on a study, with its Pareto models attached."""

from __future__ import annotations

import logging

from autoshrink.cli.common import (
    add_plugin_argument,
    add_task_arguments,
    open_existing_study,
)
from autoshrink.errors import UsageError

log = logging.getLogger(__name__)


def add_parser(verbs) -> None:
    parser = verbs.add_parser(
        "dashboard", help="open a study in optuna-dashboard",
        description="Serve optuna-dashboard on the study's storage (needs the extra"
                    " autoshrink[dashboard]), with the Pareto members' model files attached as"
                    " study artifacts.")
    add_task_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    add_plugin_argument(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    try:
        import optuna_dashboard
    except ImportError:
        raise UsageError("the dashboard needs optuna-dashboard; install it with"
                         " pip install 'autoshrink[dashboard]'") from None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port number; use e.g. --port 8080")
    # imported here, not with the module, so the parser loads no torch (autoshrink.cli)
    from autoshrink.dashboard import attach_pareto_models

    study, config = open_existing_study(args)
    store, attached = attach_pareto_models(study, config)
    log.info(f"study {study.study_name!r}: {len(study.trials)} trials, Pareto models attached:"
             f" {', '.join(attached) or 'none'}")
    log.info(f"optuna-dashboard on http://{args.host}:{args.port} (Ctrl-C to stop)")
    try:
        optuna_dashboard.run_server(config.storage_url, host=args.host, port=args.port,
                                    artifact_store=store)
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({error.strerror});"
                         " pass another --port") from None
    except KeyboardInterrupt:
        pass
    return 0
