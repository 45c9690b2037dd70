"""The plugin author's reference documents every hook and every TrialContext member."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from autoshrink import hookspecs
from autoshrink.technique import TrialContext

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def _hooks() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    return [name for name, function in vars(hookspecs).items()
            if callable(function) and hasattr(function, marker)]


def test_every_hook_has_a_docstring_and_a_reference_section():
    text = REFERENCE.read_text()
    hooks = _hooks()
    assert {"register_techniques", "trial_finished"} <= set(hooks)
    for name in hooks:
        assert inspect.getdoc(getattr(hookspecs, name)), f"hook {name} has no docstring"
        heading = re.search(rf"^### `{name}\((.*)\)`$", text, re.MULTILINE)
        assert heading, f"hook {name} is not documented in {REFERENCE.name}"
        documented = [a.strip() for a in heading.group(1).split(",") if a.strip()]
        assert documented == list(inspect.signature(getattr(hookspecs, name)).parameters)


def test_every_trial_context_member_is_documented():
    text = REFERENCE.read_text()
    fields = {f.name for f in dataclasses.fields(TrialContext)
              if not f.name.endswith("_fn") and f.name != "callbacks"}
    methods = {name for name, _ in inspect.getmembers(TrialContext, inspect.isfunction)
               if not name.startswith("_")}
    for member in fields | methods:
        assert f"`{member}" in text, f"TrialContext.{member} is not documented"
