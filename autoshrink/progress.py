"""What a long run tells the person waiting for it, through :mod:`logging`.

Every module logs to a child of the ``autoshrink`` logger (INFO: one line per trial and per
step of a search; DEBUG: per-epoch detail). A program that embeds autoshrink configures
logging as it likes; the command line calls :func:`configure` once. Baseline training shows
a progress bar when stderr is a terminal and a line every few epochs otherwise (a log file
should not fill with carriage returns).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Callable, Iterator

from tqdm import tqdm

LOGGER = logging.getLogger("autoshrink")
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}
PROGRESS_EVERY_S = 60.0  # between the lines of a long wait: a search's progress, other machines


class _StderrHandler(logging.StreamHandler):
    """Our own handler, so configuring twice replaces it instead of printing lines twice.

    It resolves ``sys.stderr`` at each record, so output captured by a test or redirected
    after configuration still arrives where stderr points now."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; we ignore that
        pass


def configure(verbosity: int) -> None:
    """``verbosity`` -1 (``--quiet``: warnings only), 0 (progress), 1 (``--verbose``)."""
    for handler in [h for h in LOGGER.handlers if isinstance(h, _StderrHandler)]:
        LOGGER.removeHandler(handler)
    LOGGER.addHandler(_StderrHandler())
    LOGGER.setLevel(LEVELS[max(-1, min(1, verbosity))])


class FitPace:
    """How fast one training goes, from the epochs it trained since this was made (just
    before it started): a training that went on from a checkpoint (autoshrink.checkpoint)
    first reports a later epoch than 1, and the epochs before it took no time here."""

    def __init__(self):
        self.started, self.done_before = time.monotonic(), None

    def saw(self, epoch: int) -> None:
        """Note an epoch reported; the first one fixes where this training started."""
        if self.done_before is None:
            self.done_before = epoch - 1

    def seconds_an_epoch(self, epoch: int, now: float) -> float:
        return (now - self.started) / (epoch - self.done_before)


class EpochProgress:
    """The ``progress(epoch, epochs, loss)`` callback of :meth:`Trainer.fit` for long runs:
    a bar on a terminal, else a line at the first epoch it trains, every tenth and the last
    (every epoch with ``--verbose``)."""

    def __init__(self, label: str, logger: logging.Logger = LOGGER):
        self.label, self.logger, self.bar = label, logger, None
        self.pace = FitPace()  # made just before training

    def __call__(self, epoch: int, epochs: int, loss: float) -> None:
        self.pace.saw(epoch)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if sys.stderr.isatty() and not self.logger.isEnabledFor(logging.DEBUG):
            self._bar(epochs).set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
            if epoch == epochs:
                self.close()
        else:
            first = self.pace.done_before + 1
            level = (logging.INFO if epoch in (first, epochs) or epoch % 10 == 0
                     else logging.DEBUG)
            self.logger.log(level, "  %s epoch %d/%d: loss %.4f%s", self.label, epoch, epochs,
                            loss, self._pace(epoch, epochs))

    def _pace(self, epoch: int, epochs: int) -> str:
        """Time per epoch and to go, so a log file shows when a long training will end (for
        trainings of a minute or more: a few seconds' need no forecast), and the time it took;
        from the epochs trained since this object was made."""
        now, done_before = time.monotonic(), self.pace.done_before
        if epoch == epochs:
            elapsed = duration(now - self.pace.started)
            return (f" ({elapsed} in all)" if not done_before else
                    f" ({elapsed} for the last {epoch - done_before} epochs)")
        per_epoch = self.pace.seconds_an_epoch(epoch, now)
        if per_epoch * (epochs - done_before) < 60:
            return ""
        return (f" ({duration(per_epoch)} an epoch, about"
                f" {duration(per_epoch * (epochs - epoch))} to go)")

    def _bar(self, epochs: int) -> tqdm:
        if self.bar is None:
            self.bar = tqdm(total=epochs, initial=self.pace.done_before, desc=f"  {self.label}",
                            unit="epoch", file=sys.stderr, leave=False, dynamic_ncols=True,
                            mininterval=0)  # one update per epoch: never too many
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# the plan step whose technique is running now (autoshrink.plan.apply_stage), for the heartbeat
_running_step: contextvars.ContextVar[str | None] = contextvars.ContextVar("running_step",
                                                                           default=None)
FIRST_HEARTBEAT_S = 60.0  # a trial shorter than this prints nothing while it runs
LONGEST_HEARTBEAT_GAP_S = 600.0


@contextlib.contextmanager
def running_step(name: str) -> Iterator[None]:
    """Mark ``name``'s technique as running, so a trial's heartbeat and checkpoints can say
    what it waits on."""
    token = _running_step.set(name)
    try:
        yield
    finally:
        _running_step.reset(token)


def current_step() -> str | None:
    """The technique running now, if any (None: the engine's own work)."""
    return _running_step.get()


def training_name(label: str, technique: str | None) -> str:
    """How the log names a training: ``label`` alone for the engine's own ("training"), after
    the ``technique`` that runs it otherwise ("prune-l1's fine-tuning after step 2 of 5")."""
    return label if technique is None else f"{technique}'s {label}"


class TrialHeartbeat:
    """A line now and then while one trial runs long (minutes on a large task, and a trial
    prints nothing else until it ends): where it is, after a minute and then each time its
    running time has doubled, at most ten minutes apart. Fed by its training's epochs, and by
    the batches a technique's own training loop draws (AdapNet's periods)."""

    def __init__(self, number: int, logger: logging.Logger = LOGGER):
        self.number, self.logger = number, logger
        self.started = time.monotonic()
        self.next_line = FIRST_HEARTBEAT_S

    def fit(self, label: str) -> Callable[[int, int, float], None]:
        """The ``progress`` callback of one :meth:`Trainer.fit`, whose lines name it by
        ``label`` and the technique running it (:func:`training_name`)."""
        step, pace = training_name(label, current_step()), FitPace()

        def epoch_done(epoch: int, epochs: int, loss: float) -> None:
            pace.saw(epoch)
            now = time.monotonic()
            if (running := self._due(now)) is None:
                return
            rest = ("" if epoch == epochs else
                    f", about {duration(pace.seconds_an_epoch(epoch, now) * (epochs - epoch))}"
                    " to the end of this training")
            self._say(running, f"{step}, epoch {epoch}/{epochs}, loss {loss:.4f}{rest}")

        return epoch_done

    def batches(self, batches: Iterator, per_epoch: int) -> Iterator:
        """``batches`` as drawn by a technique's own training loop, which has no epochs to
        report: a line may come each time it has drawn another epoch's worth of them."""
        step = current_step() or "training"
        for drawn, batch in enumerate(batches, start=1):
            if (per_epoch and drawn % per_epoch == 0
                    and (running := self._due(time.monotonic())) is not None):
                self._say(running, f"{step}'s own training loop, epoch {drawn // per_epoch}")
            yield batch

    def _due(self, now: float) -> float | None:
        """The trial's running time if a line is due now (and the next one then set), else
        None."""
        running = now - self.started
        if running < self.next_line:
            return None
        self.next_line = min(2 * running, running + LONGEST_HEARTBEAT_GAP_S)
        return running

    def _say(self, running: float, where: str) -> None:
        self.logger.info(f"trial {self.number:>3}  running for {duration(running)}: {where}")


def duration(seconds: float) -> str:
    """A span for people: '0.4 s', '45 s', '6.5 min', '1.2 h'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def search_progress(done: int, total: int, elapsed_s: float, done_here: int, best: str,
                    timeout_s: float | None = None) -> str:
    """The periodic line of a long search: how many of its trials are done, how long the rest
    should take at the pace of this run so far (a resumed study's earlier trials do not count
    towards the pace), or when ``--timeout`` stops it if that comes first, and ``best``, the
    best result within the budget so far."""
    line = f"progress: {done} of {total} trials done after {duration(elapsed_s)}"
    if 0 < done_here and done < total:
        to_go = (total - done) * elapsed_s / done_here
        if timeout_s is not None and elapsed_s + to_go > timeout_s:
            line += (f", about {duration(to_go)} to go at this pace, but --timeout stops it"
                     f" in {duration(max(timeout_s - elapsed_s, 0))}")
        else:
            line += f", about {duration(to_go)} to go"
    return f"{line}; {best}"
