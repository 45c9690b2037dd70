"""SIGTERM ends a command as Ctrl-C does: trials in progress are recorded as interrupted (and
queued again on resume), worker processes stop with it, and the exit status says so.

``timeout``, ``docker stop``, Slurm and systemd stop a program with SIGTERM, which Python
otherwise ends at once: the search's own trial stayed RUNNING until a heartbeat noticed it, and
its ``--n-jobs`` workers ran on unseen to the end of their trials.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


@contextlib.contextmanager
def sigterm_as_interrupt(then=signal.SIG_DFL) -> Iterator[None]:
    """Within the block, the first SIGTERM raises :class:`Terminated` (a KeyboardInterrupt, so
    every clean-up written for Ctrl-C runs) and later ones get ``then``: by default they end
    the process at once. Outside the main thread, where Python cannot take signals, nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame) -> None:
        signal.signal(signal.SIGTERM, then)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
