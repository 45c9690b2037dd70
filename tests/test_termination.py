"""The interrupt gate: Ctrl-C and SIGTERM raise inside the objective and wait elsewhere."""

from __future__ import annotations

import os
import signal

import pytest

from autoshrink.termination import InterruptGate, Terminated, sigterm_as_interrupt


def send(signum: int) -> None:
    """Signal this process; Python runs the handler before the next line."""
    os.kill(os.getpid(), signum)


@pytest.mark.usefixtures("ctrl_c")
def test_a_signal_outside_the_opened_block_waits_for_let_through():
    gate = InterruptGate()
    with gate.installed():
        send(signal.SIGINT)
        send(signal.SIGINT)  # a second one adds nothing: one interrupt is raised
        with pytest.raises(KeyboardInterrupt):
            gate.let_through()
        gate.let_through()


@pytest.mark.usefixtures("ctrl_c")
def test_a_signal_inside_the_opened_block_raises_at_once():
    gate = InterruptGate()
    with gate.installed(), pytest.raises(KeyboardInterrupt), gate.opened():
        send(signal.SIGINT)
        pytest.fail("the interrupt waited")


@pytest.mark.usefixtures("ctrl_c")
def test_a_signal_held_at_the_end_of_the_block_is_raised_there_and_handlers_come_back():
    gate = InterruptGate()
    with pytest.raises(KeyboardInterrupt), gate.installed():
        send(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_sigterm_raises_terminated_and_later_ones_get_what_the_command_chose():
    """A worker ignores SIGTERMs after the first, so that the second (Slurm and the search each
    send one) cannot cut short the recording of its trial; the gate must not undo that."""
    gate = InterruptGate()
    with sigterm_as_interrupt(then=signal.SIG_IGN):
        with pytest.raises(Terminated), gate.installed():
            send(signal.SIGTERM)
            send(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        send(signal.SIGTERM)  # ignored: the test goes on
