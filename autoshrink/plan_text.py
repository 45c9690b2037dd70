"""Reading a plan as reports and log lines print it.

``ghost(ratio=3) + prune-l1(amount=0.5, steps=2) @ 50% epochs`` is how a study's fronts spell
a trial's plan, so a plan copied from one can start another search (``--start-plan``) or be
measured on another model (``inspect --plan``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from autoshrink.errors import OptionError, UsageError
from autoshrink.plan import LENGTH_SUFFIX, Plan, fixed_plan
from autoshrink.technique import NAME_PATTERN, Technique, option_assignments, parse_options

STEP = re.compile(rf"({NAME_PATTERN.pattern})\s*(?:\((.*)\))?")


def parse_plan_text(text: str, techniques: Mapping[str, Technique],
                    fixed: Mapping[str, Mapping[str, Any]],
                    label: str) -> tuple[Plan, float | None]:
    """The plan a report's text describes, and its training length if the text gives one.
    An option the text does not name takes its ``fixed`` (held) value, else its default;
    ``label`` names where the text came from in errors (a flag, or a preset's starting plan)."""
    length = None
    if found := LENGTH_SUFFIX.search(text):
        try:
            length = float(found.group(1)) / 100
        except ValueError:
            raise UsageError(f"{label} {text!r}: {found.group(1)!r} is not a percentage;"
                             " end a plan with e.g. '@ 50% epochs'") from None
    body = text[:found.start()] if found else text
    if body.strip() == "baseline":
        return Plan(()), length
    steps = []
    for part in _split_steps(text, body, label):
        match = STEP.fullmatch(part)
        if not match:
            raise UsageError(f"{label} {text!r}: {part!r} is not TECHNIQUE or"
                             " TECHNIQUE(OPTION=VALUE, ...); write plans as reports print them,"
                             " e.g. 'gap-classifier + prune-l1(amount=0.5, steps=3)'")
        name, option_text = match.group(1), match.group(2) or ""
        if name not in techniques:
            raise UsageError(f"{label} {text!r}: unknown technique {name!r}; choose from:"
                             f" {', '.join(sorted(techniques))}")
        try:
            values = option_assignments(option_text)
        except OptionError as error:
            raise UsageError(f"{label} {text!r}: {name}'s {error}") from None
        technique = techniques[name]
        held = fixed.get(name, {})
        try:
            steps.append((technique, parse_options(technique, {**held, **values})))
        except OptionError as error:
            raise UsageError(f"{label} {text!r}: {error}") from None
    try:
        plan = fixed_plan([t for t, _ in steps], [o for _, o in steps])  # refuses clashing claims
    except UsageError as error:
        raise UsageError(f"{label} {text!r}: {error}") from None
    return plan, length


def _split_steps(text: str, body: str, label: str) -> list[str]:
    """The ``+``-separated steps, leaving a ``+`` inside parentheses (``1e+03``) alone."""
    parts, depth, current = [], 0, ""
    for char in body:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "+" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    if not all(parts):
        raise UsageError(f"{label} {text!r} has an empty step; join techniques with"
                         " ' + ', e.g. 'gap-classifier + quantize-int8'")
    return parts
