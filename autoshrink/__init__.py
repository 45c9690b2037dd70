"""autoshrink: search how far a convolutional network can be shrunk under an accuracy budget."""

from autoshrink.hookspecs import hookimpl
from autoshrink.technique import Stage, Technique, TrialContext

__version__ = "0.1.0"
__all__ = ["Stage", "Technique", "TrialContext", "hookimpl", "load_model", "__version__"]


def load_model(path, host=None):
    """Load a model written by ``autoshrink export --format pt`` (see autoshrink.export)."""
    from autoshrink.export import load_model as load  # noqa: PLC0415 (keeps import light)

    return load(path, host)
