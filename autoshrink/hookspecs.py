"""Every hook a plugin can implement, and nothing else.

Registration hooks receive a ``register`` callback (keyword arguments only, as pluggy requires);
observer hooks are told about trials and may not change them.
"""

import pluggy

PROJECT = "autoshrink"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration -------------------------------------------------------------------------


@hookspec
def register_techniques(register):
    """Register compression techniques.

    Call ``register(technique)`` once per :class:`autoshrink.Technique` instance. Names must be
    unique across all installed plugins; a clash stops the run and names both plugins.
    """


@hookspec
def register_models(register):
    """Register model families.

    Call ``register(autoshrink.models.ModelSpec(...))``. The factory builds an untrained
    ``nn.Module`` for a given number of classes, input channels and input size.
    """


@hookspec
def register_datasets(register):
    """Register datasets.

    Call ``register(autoshrink.data.DatasetSpec(...))``. The loader returns in-memory arrays;
    the core splits them into train / validation / test.
    """


# --- observers ----------------------------------------------------------------------------


@hookspec
def trial_started(trial_number, plan):
    """A trial is about to run ``plan`` (an :class:`autoshrink.plan.Plan`, with the share of the
    recipe's epochs it trains for as ``plan.training_length``)."""


@hookspec
def trial_finished(trial_number, plan, metrics, error):
    """A trial ended: ``metrics`` is a dict of measured values, or ``error`` a message."""
