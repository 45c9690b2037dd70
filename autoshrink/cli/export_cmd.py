"""``autoshrink export``: one trial's model as a deployable file plus its model card."""

from __future__ import annotations

import json
from pathlib import Path

from autoshrink.cli.common import (
    add_plugin_argument,
    add_task_arguments,
    discover_plugins,
    open_existing_study,
    print_json,
)
from autoshrink.errors import UsageError

# the formats autoshrink.export.write writes, and their default file endings
SUFFIX = {"pt": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}


def add_parser(verbs) -> None:
    parser = verbs.add_parser(
        "export", help="write a trial's model to deploy, with a model card",
        description="Rebuild a trial's model from its saved weights and write it as pt (packed,"
                    " autoshrink.load_model), torchscript or onnx, with a model card (JSON and"
                    " Markdown) beside it.")
    add_task_arguments(parser)
    parser.add_argument("--trial", type=int, required=True, help="the trial number to export")
    parser.add_argument("--format", choices=tuple(SUFFIX), default="pt",
                        help="pt (smallest, one-line autoshrink loader), torchscript or onnx"
                             " (both load without autoshrink); default pt")
    parser.add_argument("--to", metavar="FILE",
                        help="where to write (default <run folder>/export/trial-N.<format>)")
    parser.add_argument("--json", action="store_true", help="print the model card as JSON")
    add_plugin_argument(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    # imported here, not with the module, so the parser loads no torch (autoshrink.cli)
    from autoshrink.export import card_markdown, model_card, write
    from autoshrink.pareto import baseline_from_study, records_from_study
    from autoshrink.search import rebuild_trial_model
    from autoshrink.task import load_task

    study, config = open_existing_study(args)
    records = {r.number: r for r in records_from_study(study)}
    record = records.get(args.trial)
    if record is None:
        completed = ", ".join(map(str, sorted(records))) or "none yet"
        raise UsageError(f"trial {args.trial} of study {study.study_name!r} has no measured"
                         f" model; completed trials: {completed}")
    host = discover_plugins(args)
    task = load_task(config, host)
    if not (config.run_dir / "models" / f"trial-{record.number}.pt").is_file():
        raise UsageError(f"trial {record.number}'s model file is not in"
                         f" {config.run_dir / 'models'}; export it where the trial ran"
                         " (--out of that worker)")
    model = rebuild_trial_model(record, task, host, config.run_dir)
    target = Path(args.to) if args.to else (config.run_dir / "export"
                                            / f"trial-{record.number}{SUFFIX[args.format]}")
    about = {"model": config.model, "num_classes": task.splits.num_classes,
             "input_shape": list(task.input_shape), "plan": record.plan_json}
    written = write(model, args.format, target, task.splits.val, about, host)
    card = model_card(record, baseline_from_study(study), task, config, args.format, target,
                      study.study_name, written)
    stem = target.with_name(target.name.removesuffix(SUFFIX[args.format]))
    stem.with_suffix(".card.json").write_text(json.dumps(card, indent=2) + "\n")
    stem.with_suffix(".card.md").write_text(card_markdown(card))
    if args.json:
        print_json(card)
    else:
        print(f"wrote {target} ({card['bytes']:,} bytes) and its model card"
              f" {stem.with_suffix('.card.md')}")
        print(f"load it: {card['load']}")
    return 0
