"""``autoshrink export``: one trial's model as a deployable file plus its model card."""

from __future__ import annotations

import argparse
import json
import os
import sys
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
SMALLEST = "smallest"  # --trial smallest: the front's first member, see smallest_within_budget


def add_parser(verbs) -> None:
    parser = verbs.add_parser(
        "export", help="write a trial's model to deploy, with a model card",
        description="Rebuild a trial's model from its saved weights and write it as pt (packed,"
                    " autoshrink.load_model), torchscript or onnx, with a model card (JSON and"
                    " Markdown) beside it.")
    add_task_arguments(parser)
    parser.add_argument("--trial", type=trial_choice, required=True, metavar="N|smallest",
                        help="the trial number to export, or 'smallest': the most reduced"
                             " model within the budget on the study's first objective")
    parser.add_argument("--max-drop", type=float, metavar="PP",
                        help="with --trial smallest: the budget in accuracy percentage points"
                             " (default: the study's)")
    parser.add_argument("--format", choices=tuple(SUFFIX),
                        help="pt (smallest, one-line autoshrink loader), torchscript or onnx"
                             " (both load without autoshrink); default: from --to's ending"
                             " (.onnx, .torchscript.pt), else pt")
    parser.add_argument("--to", metavar="FILE",
                        help="where to write: a file, or a folder (an existing one, or one"
                             " ending in /) to hold trial-N.<format>; default"
                             " <run folder>/export/")
    parser.add_argument("--json", action="store_true", help="print the model card as JSON")
    add_plugin_argument(parser)
    parser.set_defaults(run=run)


def trial_choice(text: str) -> int | str:
    """``--trial``: a trial number, or 'smallest'."""
    if text == SMALLEST:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a trial number nor"
                                         f" '{SMALLEST}'") from None


def export_target(to: str | None, fmt: str | None, trial: int,
                  default_folder: Path) -> tuple[str, Path]:
    """The format and file an export writes: ``--format``, else the one ``--to``'s ending
    names; a folder in ``--to`` gets the default file name. A file ending that names another
    format (``--to model.onnx --format pt``) is refused rather than mislabelled."""
    folder = to is None or to.endswith(("/", os.sep)) or Path(to).is_dir()
    # .torchscript.pt before .pt, which it also ends in
    named = None if folder else next(
        (f for f in ("torchscript", "onnx", "pt") if to.endswith(SUFFIX[f])), None)
    if fmt and named and fmt != named and not (fmt == "torchscript" and named == "pt"):
        raise UsageError(f"--to {to} ends in {SUFFIX[named]} (format {named}) but --format"
                         f" is {fmt}; end the file name in {SUFFIX[fmt]} or leave --format out")
    fmt = fmt or named or "pt"
    if folder:
        return fmt, Path(to or default_folder) / f"trial-{trial}{SUFFIX[fmt]}"
    return fmt, Path(to)


def smallest_within_budget(study, config, records: list):
    """The front's first member on the study's first objective: the trial that search and
    report name as its best reduction."""
    from autoshrink.pareto import LABELS, baseline_from_study, best_reduction, pareto_front

    baseline = baseline_from_study(study)
    metric = config.objectives[0]
    front = pareto_front(records, metric, baseline, config.budget)
    if not front.members:
        raise UsageError(f"no trial of study {study.study_name!r} is within {config.budget:g} pp"
                         " of the baseline; pass a larger --max-drop or a trial number")
    chosen = front.members[0]
    print(f"trial {chosen.number}: the fewest {LABELS[metric]} within {config.budget:g} pp"
          f" ({best_reduction(front, baseline):.1f}x, drop {chosen.drop_pp(baseline):.2f} pp)",
          file=sys.stderr)
    return chosen


def run(args) -> int:
    # imported here, not with the module, so the parser loads no torch (autoshrink.cli)
    from autoshrink.export import card_markdown, model_card, write
    from autoshrink.pareto import baseline_from_study, records_from_study, stopped_from_study
    from autoshrink.search import rebuild_trial_model
    from autoshrink.task import load_task

    if args.max_drop is not None and args.trial != SMALLEST:
        raise UsageError(f"--max-drop chooses among trials: use it with --trial {SMALLEST},"
                         f" not --trial {args.trial}")
    study, config = open_existing_study(args, max_drop=args.max_drop)
    records = {r.number: r for r in records_from_study(study)}
    if args.trial == SMALLEST:
        record = smallest_within_budget(study, config, list(records.values()))
    else:
        record = records.get(args.trial)
    if record is None:
        completed = ", ".join(map(str, sorted(records))) or "none yet"
        stopped = next((s for s in stopped_from_study(study) if s.number == args.trial), None)
        why = f" (it {stopped.state}: {stopped.reason})" if stopped else ""
        raise UsageError(f"trial {args.trial} of study {study.study_name!r} has no measured"
                         f" model{why}; completed trials: {completed}")
    fmt, target = export_target(args.to, args.format, record.number, config.run_dir / "export")
    host = discover_plugins(args)
    task = load_task(config, host)
    if not (config.run_dir / "models" / f"trial-{record.number}.pt").is_file():
        raise UsageError(f"trial {record.number}'s model file is not in"
                         f" {config.run_dir / 'models'}; export it where the trial ran"
                         " (--out of that worker)")
    model = rebuild_trial_model(record, task, host, config.run_dir)
    about = {"model": config.model, "num_classes": task.splits.num_classes,
             "input_shape": list(task.input_shape), "plan": record.plan_json}
    written = write(model, fmt, target, task.splits.val, about, host, task.build_model())
    card = model_card(record, baseline_from_study(study), task, config, fmt, target,
                      study.study_name, written)
    # named after the whole file, so the cards of one trial's formats in a folder stay apart
    card_json, card_md = (target.with_name(f"{target.name}.card.{ext}") for ext in ("json", "md"))
    card_json.write_text(json.dumps(card, indent=2) + "\n")
    card_md.write_text(card_markdown(card))
    if args.json:
        print_json(card)
    else:
        print(f"wrote {target} ({card['bytes']:,} bytes) and its model card {card_md}")
        print(f"load it: {card['load']}")
    return 0
