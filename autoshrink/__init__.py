"""autoshrink: search how far a convolutional network can be shrunk under an accuracy budget.

The plugin API (``Technique``, ``Stage``, ``TrialContext``) is loaded on first use: it needs
torch, which the command line only loads once a verb has work to do, so ``--help`` and
mistyped flags answer at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from autoshrink.hookspecs import hookimpl

if TYPE_CHECKING:
    from autoshrink.technique import Stage, Technique, TrialContext

__version__ = "0.1.0"
__all__ = ["Stage", "Technique", "TrialContext", "hookimpl", "load_model", "__version__"]
_PLUGIN_API = {"Stage", "Technique", "TrialContext"}


def __getattr__(name: str):
    if name in _PLUGIN_API:
        return getattr(importlib.import_module("autoshrink.technique"), name)
    raise AttributeError(f"module 'autoshrink' has no attribute {name!r}")


def load_model(path, host=None):
    """Load a model written by ``autoshrink export --format pt`` (see autoshrink.export)."""
    from autoshrink.export import load_model as load  # noqa: PLC0415 (keeps import light)

    return load(path, host)
