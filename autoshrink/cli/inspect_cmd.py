"""``autoshrink inspect``: build a model, apply techniques with fixed options, measure it.

Techniques come from ``--apply`` (one technique and its options per flag) and ``--plan`` (a
whole plan in the reports' spelling); both together make one plan, run in stage order.

No data and no training: fine-tuning steps are skipped and calibration uses random inputs, so the
numbers are about structure (params, MACs, artifact bytes), not accuracy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from autoshrink.cli.common import add_plugin_argument, discover_plugins, print_json
from autoshrink.errors import OptionError, TrialFailed, UsageError

if TYPE_CHECKING:
    from autoshrink.plugins import PluginHost


def add_parser(verbs) -> None:
    parser = verbs.add_parser("inspect", help="measure a model with techniques applied",
                              description="Build a model, apply techniques, print params, MACs"
                                          " and artifact size (no training).")
    parser.add_argument("--model", default="smallcnn", help="model name or module:callable")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--input-shape", default="1x16x16", help="CxHxW, e.g. 3x32x32")
    parser.add_argument("--apply", action="append", default=[], metavar="TECH[:k=v,...]",
                        help="apply a technique with fixed options (repeatable; several"
                             " techniques at their defaults: --apply ghost,quantize-int8)")
    parser.add_argument("--plan", metavar="PLAN",
                        help="apply a plan as reports print it, e.g. one copied from a study's"
                             " front: 'ghost(ratio=3) + prune-l1(amount=0.5, steps=2)' (its"
                             " '@ N%% epochs' is ignored: inspect trains nothing)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_plugin_argument(parser)
    parser.set_defaults(run=run)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input-shape {text!r} is not CxHxW; use e.g. 3x32x32")
    if shape[1] != shape[2]:
        side = max(shape[1:])
        raise UsageError(f"--input-shape {text!r} is not square: models are built for, and"
                         f" searches resize images to, N x N; use e.g. {shape[0]}x{side}x{side}")
    return shape


def parse_apply(host: PluginHost, text: str) -> list:
    """``TECH[:k=v,...]``, or ``TECH,TECH`` (each at its defaults, like ``--techniques``)."""
    if "(" in text or "+" in text.partition(":")[0]:
        raise UsageError(f"--apply {text!r} is written as reports print plans; pass it as"
                         f" --plan {text!r}, or write each technique as --apply TECH:k=v,...")
    if ":" not in text and "=" not in text:
        return [(technique, technique.Options())
                for technique in map(host.technique, filter(None, text.split(",")))]
    from autoshrink.technique import option_assignments

    name, _, option_text = text.partition(":")
    technique = host.technique(name)
    try:
        values = option_assignments(option_text)
    except OptionError as error:
        raise UsageError(f"--apply {text!r}: {error}; give each technique with options its"
                         " own --apply") from None
    return [(technique, technique.parse_options(values))]


def run(args) -> int:
    if args.num_classes < 2:
        raise UsageError(f"--num-classes {args.num_classes} must be at least 2")
    shape = parse_shape(args.input_shape)
    # imported here, not with the module, so the parser loads no torch (autoshrink.cli)
    import torch

    from autoshrink import artifact
    from autoshrink.metrics import complexity
    from autoshrink.models import check_takes_input
    from autoshrink.plan import applicability, apply_stage, does_not_apply, fixed_plan
    from autoshrink.technique import Stage, TrialContext

    host = discover_plugins(args)
    spec = host.model(args.model)
    torch.manual_seed(0)  # the same weights, so the same counts (non-zero, pruned) every run
    spec.check_input_size(shape[1], f"--input-shape {args.input_shape!r}")
    model = spec.build(args.num_classes, shape[0], shape[1])
    check_takes_input(model, spec.name, args.num_classes, shape, "--input-shape")
    chosen = [step for text in args.apply for step in parse_apply(host, text)]
    if args.plan is not None:
        from autoshrink.plan_text import parse_plan_text

        written, _ = parse_plan_text(args.plan, host.techniques, {}, "--plan")
        chosen += [(step.technique, step.options) for step in written.steps]
    plan = fixed_plan([t for t, _ in chosen], [o for _, o in chosen])
    ctx = TrialContext(shape, args.num_classes)
    reasons: dict[str, str] = {}
    for stage in Stage:
        # later steps must apply to the rewritten model, as a search would offer them
        refused = next((step for step in plan.at(stage) if reasons.get(step.name)), None)
        if refused is not None:
            why = does_not_apply(refused.name, reasons[refused.name],
                                 after_rewrites=bool(plan.at(Stage.ARCHITECTURE)))
            raise UsageError(f"cannot apply to {spec.name}: {why}")
        if stage is Stage.QUANTIZATION:
            counted = complexity(model, shape)
            model.eval()
        try:
            model = apply_stage(plan, stage, model, ctx)
        except TrialFailed as error:
            raise UsageError(f"cannot apply to {spec.name}: {error}") from None
        if stage is Stage.ARCHITECTURE:
            reasons = applicability(host.techniques, model)
    with tempfile.TemporaryDirectory() as folder:
        size = artifact.save(model, Path(folder) / "model.pt")
    result = {
        "model": spec.name, "input_shape": list(shape), "num_classes": args.num_classes,
        "applied": [step.describe() for step in plan.steps],
        "params": counted.params, "nonzero_params": counted.nonzero_params,
        "macs": counted.macs, "size_bytes": size,
        "techniques": {name: {"applies": not reason, "reason": reason or None}
                       for name, reason in sorted(reasons.items())},
    }
    if args.json:
        print_json(result)
        return 0
    print(f"{spec.name} {args.input_shape}, {args.num_classes} classes"
          f"{' + ' + plan.describe() if plan.steps else ''}")
    print(f"  params {result['params']:,} (non-zero {result['nonzero_params']:,}),"
          f" MACs {result['macs']:,}, artifact {size:,} bytes")
    print("techniques, on the model as rewritten:" if plan.at(Stage.ARCHITECTURE)
          else "techniques:")
    for name, reason in sorted(reasons.items()):
        print(f"  {name:<20} {'applies' if not reason else 'no: ' + reason}")
    return 0
