"""autoshrink: search how far a convolutional network can be shrunk under an accuracy budget."""

from autoshrink.hookspecs import hookimpl
from autoshrink.technique import Stage, Technique, TrialContext

__version__ = "0.1.0"
__all__ = ["Stage", "Technique", "TrialContext", "hookimpl", "__version__"]
