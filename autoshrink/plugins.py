"""The plugin host: loads every ``autoshrink`` entry point and collects what they register.

Built-in techniques are ordinary entry points of the ``autoshrink`` distribution. Each entry point
is loaded on its own so that one broken plugin is reported and skipped instead of stopping the
tool (pluggy's ``load_setuptools_entrypoints`` aborts on the first failure).
Set ``AUTOSHRINK_PLUGINS=name,name`` to load only the named entry points. Code outside installed
distributions is loaded only when named explicitly (``--plugin module`` or ``--plugin file.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
from typing import Any

import pluggy

from autoshrink import hookspecs
from autoshrink.data import DatasetSpec
from autoshrink.errors import PluginError, UnknownNameError, UsageError
from autoshrink.imports import import_named
from autoshrink.models import ModelSpec, user_model_spec
from autoshrink.technique import Technique, declaration_problem

log = logging.getLogger(__name__)

ALLOW_ENV = "AUTOSHRINK_PLUGINS"
KINDS = {"technique": Technique, "model": ModelSpec, "dataset": DatasetSpec}


@dataclasses.dataclass(frozen=True)
class Registered:
    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str
    version: str


@dataclasses.dataclass(frozen=True)
class BrokenPlugin:
    plugin: str
    distribution: str
    error: str


class PluginHost:
    """Owns the pluggy manager and the registry of techniques, models and datasets."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.registry: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        self.broken: list[BrokenPlugin] = []
        self._origin: dict[str, tuple[str, str]] = {}
        self.explicit: tuple[str, ...] = ()  # the --plugin references, for worker processes
        self._failed_observers: set[tuple[str, str]] = set()  # (plugin, hook) warned of

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def discover(cls, allow: list[str] | None = None,
                 explicit: tuple[str, ...] = ()) -> PluginHost:
        """Load installed entry points (optionally only ``allow``) and the ``explicit`` plugin
        modules or files, then collect registrations."""
        host = cls()
        host.explicit = tuple(explicit)
        for reference in explicit:
            host.add(_import_explicit(reference), reference, "--plugin")
            _check_implements_a_hook(host.manager, reference)
        if allow is None and os.environ.get(ALLOW_ENV):
            allow = [n.strip() for n in os.environ[ALLOW_ENV].split(",") if n.strip()]
        for entry_point in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            if allow is not None and entry_point.name not in allow:
                continue
            dist = entry_point.dist
            dist_name = dist.metadata["Name"] if dist else "?"
            version = dist.version if dist else "?"
            try:
                module = entry_point.load()
            except Exception as error:  # a broken plugin must not stop the tool
                host.broken.append(BrokenPlugin(entry_point.name, dist_name,
                                                f"{type(error).__name__}: {error}"))
                continue
            host.add(module, entry_point.name, dist_name, version)
        host.collect()
        return host

    def add(self, plugin: object, name: str, distribution: str = "?", version: str = "?") -> None:
        """Register a plugin object (module or instance) under ``name``."""
        if self.manager.has_plugin(name):
            return
        self.manager.register(plugin, name=name)
        self._origin[name] = (distribution, version)

    def collect(self) -> None:
        """Call the registration hooks of every plugin, one plugin at a time."""
        for kind, hook in (("technique", "register_techniques"), ("model", "register_models"),
                           ("dataset", "register_datasets")):
            for impl in getattr(self.manager.hook, hook).get_hookimpls():
                plugin_name = impl.plugin_name
                distribution, version = self._origin.get(plugin_name, ("?", "?"))

                def register(obj, _kind=kind, _plugin=plugin_name, _dist=distribution,
                             _version=version):
                    self._register(_kind, obj, _plugin, _dist, _version)

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as error:  # a plugin whose hook crashes is skipped
                    self.broken.append(BrokenPlugin(plugin_name, distribution,
                                                    f"{type(error).__name__}: {error}"))

    def _register(self, kind: str, obj: Any, plugin: str, distribution: str,
                  version: str) -> None:
        if not isinstance(obj, KINDS[kind]):
            raise PluginError(
                f"plugin {plugin!r} registered {obj!r} as a {kind}; register a"
                f" {KINDS[kind].__name__} instance instead"
            )
        problem = declaration_problem(obj) if kind == "technique" else None
        if problem:
            raise PluginError(f"plugin {plugin!r} ({distribution}) registered technique"
                              f" {getattr(obj, 'name', '?')!r}, but {problem}")
        table = self.registry[kind]
        if obj.name in table:
            other = table[obj.name]
            raise PluginError(
                f"{kind} name {obj.name!r} is registered twice: by plugin {other.plugin!r}"
                f" ({other.distribution}) and by plugin {plugin!r} ({distribution});"
                f" uninstall one, or load only one with {ALLOW_ENV}=..."
            )
        table[obj.name] = Registered(kind, obj.name, obj, plugin, distribution, version)

    # --- lookup -------------------------------------------------------------------------

    @property
    def techniques(self) -> dict[str, Technique]:
        return {name: reg.obj for name, reg in self.registry["technique"].items()}

    def technique(self, name: str) -> Technique:
        if name not in self.registry["technique"]:
            raise UnknownNameError("technique", name, list(self.registry["technique"]))
        return self.registry["technique"][name].obj

    def model(self, name: str) -> ModelSpec:
        if name in self.registry["model"]:
            return self.registry["model"][name].obj
        if ":" in name:
            return user_model_spec(name)
        raise UnknownNameError("model", name,
                               list(self.registry["model"]) + ["package.module:callable"])

    def dataset(self, name: str) -> tuple[DatasetSpec, str | None]:
        """The spec for ``name`` and its argument (``imagefolder:<path>`` -> path)."""
        if name in self.registry["dataset"]:
            return self.registry["dataset"][name].obj, None
        prefix, _, argument = name.partition(":")
        spec = self.registry["dataset"].get(prefix)
        if spec is not None and spec.obj.parametrised and argument:
            return spec.obj, argument
        known = [n + (":<path>" if r.obj.parametrised else "")
                 for n, r in self.registry["dataset"].items()]
        raise UnknownNameError("dataset", name, known)

    # --- observers ----------------------------------------------------------------------

    def notify_trial_started(self, trial_number: int, plan) -> None:
        self._notify("trial_started", trial_number=trial_number, plan=plan)

    def notify_trial_finished(self, trial_number: int, plan, metrics, error) -> None:
        self._notify("trial_finished", trial_number=trial_number, plan=plan, metrics=metrics,
                     error=error)

    def _notify(self, hook: str, **arguments) -> None:
        """Call each observer on its own: one that raises is warned of, once, and neither
        stops the others nor fails the trial it was told about."""
        for impl in getattr(self.manager.hook, hook).get_hookimpls():
            try:
                impl.function(**arguments)
            except Exception as error:
                if (impl.plugin_name, hook) not in self._failed_observers:
                    self._failed_observers.add((impl.plugin_name, hook))
                    log.warning(f"the {hook} hook of plugin {impl.plugin_name!r} raised"
                                f" {type(error).__name__}: {error}; the search goes on without"
                                " it (said once)")


HOOK_NAMES = frozenset(name for name, value in vars(hookspecs).items()
                       if hasattr(value, f"{hookspecs.PROJECT}_spec"))


def _check_implements_a_hook(manager: pluggy.PluginManager, reference: str) -> None:
    """Refuse a --plugin that pluggy finds no hook in: most often its functions lack the
    @hookimpl mark, and it would be ignored without a word."""
    plugin = manager.get_plugin(reference)
    if manager.get_hookcallers(plugin):
        return
    unmarked = sorted(name for name in dir(plugin) if name in HOOK_NAMES)
    fix = (f"mark {', '.join(unmarked)} with @hookimpl (from autoshrink import hookimpl)"
           if unmarked else "define register_techniques, register_models or register_datasets"
           " marked with @hookimpl (from autoshrink import hookimpl)")
    raise UsageError(f"--plugin {reference!r} implements no autoshrink hook; {fix}")


def _import_explicit(reference: str):
    """A module named on the command line: an importable module name or a path to a .py file."""
    try:
        return import_named(reference, "autoshrink_plugin_")
    except Exception as error:
        raise UsageError(f"cannot load --plugin {reference!r} ({type(error).__name__}: {error});"
                         " pass an importable module name or the path of a .py file") from None
