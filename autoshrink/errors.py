"""One error hierarchy. Messages quote the bad value and say how to fix it.

Only the CLI turns these into exit codes; library code raises them.
"""


class AutoshrinkError(Exception):
    """Base class for every error autoshrink raises on purpose."""


class UsageError(AutoshrinkError):
    """The user asked for something that cannot be done as asked (exit code 2)."""


class UnknownNameError(UsageError):
    """A technique, model, dataset or objective name that nothing registered."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(
            f"unknown {kind} {name!r}; choose one of: {', '.join(self.known)}"
            f" (run 'autoshrink plugins' to see where each comes from)"
        )


class OptionError(UsageError):
    """A technique option with a bad key or value."""


class DataError(UsageError):
    """A dataset that cannot be found or read."""


class BaselineDidNotLearn(UsageError):
    """The uncompressed model trained to no better than guessing: nothing to compress against."""


class PluginError(AutoshrinkError):
    """A plugin broke the registry contract (duplicate name, bad registration)."""


class TrialFailed(AutoshrinkError):
    """A trial could not finish; the study records the reason and goes on."""


class TrialsKeepFailing(AutoshrinkError):
    """Every recent trial failed: a cause they share, not one plugin; the search stopped."""


class TrialAborted(AutoshrinkError):
    """Training showed the trial cannot reach the accuracy budget; it is stopped early."""
