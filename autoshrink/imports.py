"""Modules the command line names (``--plugin``, ``--model module:callable``): an importable
module name, or the path of a ``.py`` file.

The current directory counts as importable, as it does for ``python -m``: the console script
``autoshrink`` does not put it on the path, so ``--model my_models:net`` next to
``my_models.py`` failed with "No module named 'my_models'". It goes last, so an installed
package of the same name still wins; ``--n-jobs`` workers inherit the path.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from types import ModuleType


def import_named(reference: str, prefix: str) -> ModuleType:
    """The module ``reference`` names; a file is loaded once per process as
    ``<prefix><file stem>``."""
    if not reference.endswith(".py"):
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        return importlib.import_module(reference)
    path = Path(reference).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no file {reference}")
    name = f"{prefix}{path.stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def parameter_names(target) -> tuple[set[str], bool]:
    """The names a user's callable takes, and whether it also takes ``**kwargs``; none for a
    callable without a signature (some builtins), which then gets no optional arguments."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return set(), False
    return set(parameters), any(p.kind is inspect.Parameter.VAR_KEYWORD
                                for p in parameters.values())
