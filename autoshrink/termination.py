"""SIGTERM ends a command as Ctrl-C does: trials in progress are recorded as interrupted (and
queued again on resume), worker processes stop with it, and the exit status says so.

``timeout``, ``docker stop``, Slurm and systemd stop a program with SIGTERM, which Python
otherwise ends at once: the search's own trial stayed RUNNING until a heartbeat noticed it, and
its ``--n-jobs`` workers ran on unseen to the end of their trials. Either signal is kept out of
Optuna's bookkeeping between trials (:class:`InterruptGate`).
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


class InterruptGate:
    """Lets Ctrl-C and SIGTERM stop a search only where the study is not being read or written.

    Landing in Optuna's bookkeeping between trials (asking for the next trial, stopping the
    heartbeat thread, writing a result), a signal left the trial RUNNING, the heartbeat thread
    beating on so the process never exited, or Optuna failing in its own clean-up. Cutting a
    read of a SQLite study short, it left the read's statement open (its frames live on in the
    interrupt's traceback), and the write that records the trial then failed at once whenever
    another worker was writing ("database is locked"). While the gate is installed a signal
    raises at once inside :meth:`opened` (a trial's training and measuring) and is otherwise
    held until :meth:`let_through` (a callback after each trial is recorded) or the end of
    :meth:`installed`. Further signals while one is held add nothing: Slurm and the search's
    process each send a worker one.
    """

    def __init__(self) -> None:
        self._open = False
        self._held: tuple | None = None  # (handler it would have run, signal number)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Hold the signals within the block; a held one is raised at its end. Outside the main
        thread, where Python cannot take signals, nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handlers = {signum: handler for signum in (signal.SIGINT, signal.SIGTERM)
                    if callable(handler := signal.getsignal(signum))}

        def hold_or_raise(signum, frame) -> None:
            if self._open:
                handlers[signum](signum, frame)
            elif self._held is None:
                self._held = (handlers[signum], signum)

        for signum in handlers:
            signal.signal(signum, hold_or_raise)
        try:
            yield
            self.let_through()
        finally:
            self._held = None
            for signum, handler in handlers.items():
                if signal.getsignal(signum) is hold_or_raise:  # SIGTERM's handler replaces itself
                    signal.signal(signum, handler)

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """Let signals raise at once within the block, after raising one held before it."""
        self.let_through()
        self._open = True
        try:
            yield
        finally:
            self._open = False

    def let_through(self) -> None:
        """Raise the signal held since the last call, if any, as its own handler would have."""
        if self._held is not None:
            handler, signum = self._held
            self._held = None
            handler(signum, None)
