"""Training checkpoints: a trial goes on where an interrupted run of its plan stopped, and
the baseline's training where an interrupted search stopped it.

A trial stopped by Ctrl-C, SIGTERM, ``kill -9`` or a power cut is queued again with the same
plan (autoshrink.storage); without checkpoints its work started over, and on a GPU preset or a
large dataset that is minutes to hours lost each time. A trial trains several times in order:
its techniques' fine-tunes (pruning steps, a pyramid's blocks) and its main training, each a
``Trainer.fit`` with a file of its own, numbered in that order. Once ``SAVE_EVERY_S`` have passed
since the trial started or last saved, the trainer saves its state after an epoch (weights,
optimizer, schedule, random number generators, epochs done), and saves the end of a training
(weights and generators): the trial queued in its place takes the trainings that ended from
their files instead of training them again, and goes on inside the one that was cut short. A
fit that keeps its best epoch (with patience) saves only its end. Short trials, such as every
trial of the default search, write nothing.

The files are named after the trial's parameters, which the queued trial shares, in a folder of
its study; they are deleted when the trial ends any other way than an interruption, and the
study's folder when a run ends with none of its trials waiting or running. The baseline's file
sits in its cache entry's folder (autoshrink.task), until the baseline is cached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import torch

from autoshrink.progress import current_step, training_name

log = logging.getLogger(__name__)

SAVE_EVERY_S = 120.0  # the most training time an interruption loses, once training runs longer
FOLDER = "checkpoints"  # in the run folder


@dataclasses.dataclass
class Checkpoints:
    """The checkpoints of one job's trainings (a trial's or the baseline's), handed out in the
    order it trains, and when it next saves. ``keep`` returns what the job wants saved with
    each (the early abort's curve) and ``restore`` takes that back when a file is taken up."""

    label: str  # whose they are, in the log: "trial   3", "baseline"
    # training k keeps its state in <stem>-<k>.pt; None: nothing is saved (a trial's stem is
    # set once its plan is sampled, before it trains)
    stem: Path | None = None
    every_s: float = SAVE_EVERY_S
    keep: Callable[[], dict] = dict
    restore: Callable[[dict], None] = lambda kept: None
    # what the interrupted runs spent up to the last file taken up
    earlier_s: float = dataclasses.field(default=0.0, init=False)
    # the epochs taken from files instead of trained again
    resumed_epochs: int = dataclasses.field(default=0, init=False)
    # where the last file written or taken up leaves the job, for the interruption's line
    saved: str | None = dataclasses.field(default=None, init=False)
    _count: int = dataclasses.field(default=0, init=False)
    _made: float = dataclasses.field(default_factory=time.monotonic, init=False)
    _last: float = dataclasses.field(default_factory=time.monotonic, init=False)

    def next_training(self, label: str) -> TrainingCheckpoint | None:
        """The checkpoint of the job's next training, which ``label`` ("training",
        "fine-tuning") and the technique running it, if any (as the heartbeat reads it), name
        in the log; None before the stem is known."""
        if self.stem is None:
            return None
        index, self._count = self._count, self._count + 1
        technique = current_step()
        what = training_name(label, technique)
        # the job's first training, the engine's own, needs no number
        number = None if index == 0 and technique is None else index + 1
        return TrainingCheckpoint(Path(f"{self.stem}-{index}.pt"), self, what, number)

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def discard(self) -> None:
        """Delete every file of the job's trainings."""
        self.saved = None
        if self.stem is not None:
            for path in self.stem.parent.glob(f"{self.stem.name}-*.pt*"):
                path.unlink(missing_ok=True)


@dataclasses.dataclass
class TrainingCheckpoint:
    """Where one training of a job keeps its state: part-way (``epoch`` of ``epochs`` done)
    or at its end (``finished``)."""

    path: Path
    owner: Checkpoints
    what: str  # in the log: "fine-tuning", "prune-l1's fine-tuning"
    number: int | None = None  # which of the job's trainings, in the log where it says more
    # whether the file holds this training's state, saved or taken up
    in_file: bool = dataclasses.field(default=False, init=False)

    @property
    def name(self) -> str:
        """In the log: "training 3 (prune-l1's fine-tuning)", "fine-tuning"."""
        return self._named()

    def _named(self, detail: str | None = None) -> str:
        """``name``, with ``detail`` in its parentheses: "training 3 (prune-l1's fine-tuning,
        2 epochs)", "fine-tuning (2 epochs)"."""
        head, notes = ((self.what, []) if self.number is None
                       else (f"training {self.number}", [self.what]))
        notes += [detail] if detail else []
        return f"{head} ({', '.join(notes)})" if notes else head

    def load(self) -> dict | None:
        """The saved state, or None when there is none; a file that cannot be read (a failing
        disk) is deleted with a warning, and training starts over."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # whatever makes it unreadable, the training starts over
            log.warning(f"could not read the training checkpoint {self.path} ({error}); its"
                        " training starts from the beginning")
            self.discard()
            return None
        self.owner._last, self.in_file = time.monotonic(), True
        return state

    def resumed(self, state: dict) -> None:
        """Say so and hand what the job kept back to it, once the trainer took up ``state``."""
        owner, epochs = self.owner, state["epoch"]
        owner.earlier_s, owner.saved = state["seconds"], self._where(state)
        owner.resumed_epochs += epochs
        owner.restore(state["kept"])
        if state["finished"]:
            log.info(f"{owner.label}  takes its {self._named(f'{epochs} epochs')} from an"
                     " interrupted run instead of training it again")
        else:
            log.info(f"{owner.label}  goes on after epoch {epochs} of {state['epochs']} of its"
                     f" {self.name}, where an interrupted run stopped")

    def due(self) -> bool:
        return self.owner.due()

    def save(self, state: dict) -> None:
        """Write ``state`` beside the file, then rename it over: a kill mid-write leaves the
        last whole checkpoint."""
        owner = self.owner
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        seconds = owner.earlier_s + time.monotonic() - owner._made
        torch.save({**state, "kept": owner.keep(), "seconds": seconds}, partial)
        os.replace(partial, self.path)
        owner._last, owner.saved = time.monotonic(), self._where(state)
        self.in_file = True

    def discard(self) -> None:
        self.in_file = False
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".partial").unlink(missing_ok=True)

    def _where(self, state: dict) -> str:
        if state["finished"]:
            return f"up to the end of its {self.name}"
        return f"after epoch {state['epoch']} of its {self.name}"


def checkpoint_stem(run_dir: Path, study_name: str, params: Mapping[str, Any]) -> Path:
    """Where the trainings of a trial of these parameters keep their states (the files add
    "-<k>.pt"): the same for a trial and the one queued again in its place. Study names are
    file-name safe (autoshrink.config)."""
    text = json.dumps(sorted(params.items()), default=str)
    return run_dir / FOLDER / study_name / hashlib.sha256(text.encode()).hexdigest()[:20]


@contextlib.contextmanager
def kept_only_if_interrupted(checkpoints: Checkpoints) -> Iterator[None]:
    """Delete the files of ``checkpoints`` when the block ends, unless Ctrl-C or SIGTERM ends
    it (a KeyboardInterrupt): the job run again goes on from them, which the user is told of."""
    try:
        yield
    except KeyboardInterrupt:
        if checkpoints.saved is not None:
            log.info(f"{checkpoints.label}  interrupted; its work is saved {checkpoints.saved},"
                     " and the same command goes on from there")
        raise
    except Exception:
        checkpoints.discard()
        raise
    checkpoints.discard()


def remove_unneeded(study: optuna.Study, run_dir: Path) -> None:
    """Delete the study's checkpoints once none of its trials waits or runs, so that no trial
    will go on from them. The folder is looked for first: most runs leave none, and reading
    every trial of a large study at the end of each run would be for nothing."""
    folder = run_dir / FOLDER / study.study_name
    if not folder.is_dir():
        return
    states = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    if study.get_trials(deepcopy=False, states=states):
        return
    shutil.rmtree(folder)
    with contextlib.suppress(OSError):  # other studies' checkpoints may remain
        (run_dir / FOLDER).rmdir()
