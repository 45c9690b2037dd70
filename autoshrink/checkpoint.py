"""Training checkpoints: a trial's training goes on where an interrupted run of its plan stopped,
and the baseline's where an interrupted search stopped training it.

A trial stopped by Ctrl-C, SIGTERM, ``kill -9`` or a power cut is queued again with the same
plan (autoshrink.storage); without a checkpoint its training started over, and on a GPU preset
or a large dataset that is minutes to hours of work lost each time. The trainer writes the
training's state (weights, optimizer, schedule, random number generators, epochs done) after an
epoch once ``SAVE_EVERY_S`` have passed since the training started or last saved, so a short
training, such as every trial of the default search, writes nothing. The file is named after
the trial's parameters, which the queued trial shares, in a folder of its study; it is deleted
when the trial ends in any other way than an interruption, and the study's folder when a run
ends with none of its trials waiting or running. The baseline's file sits in its cache entry's
folder (autoshrink.task), until the baseline is cached.
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

log = logging.getLogger(__name__)

SAVE_EVERY_S = 120.0  # the most training time an interruption loses, once training runs longer
FOLDER = "checkpoints"  # in the run folder


@dataclasses.dataclass
class TrainingCheckpoint:
    """Where one training keeps its state, and when it next saves it. ``keep`` returns what
    the caller wants saved with it (the early abort's curve) and ``restore`` takes that back,
    with the number of epochs done, when training goes on from the file."""

    path: Path
    every_s: float = SAVE_EVERY_S
    keep: Callable[[], dict] = dict
    restore: Callable[[dict, int], None] = lambda kept, epochs_done: None
    # the epochs done in the file, once one is saved or loaded
    saved_epochs: int | None = dataclasses.field(default=None, init=False)
    # the epochs done when training went on from the file
    resumed_after: int | None = dataclasses.field(default=None, init=False)
    # what the interrupted runs spent on this training up to the file's save
    earlier_s: float = dataclasses.field(default=0.0, init=False)
    _made: float = dataclasses.field(default_factory=time.monotonic, init=False)
    _last: float = dataclasses.field(default_factory=time.monotonic, init=False)

    def load(self) -> dict | None:
        """The saved state, or None when there is none; a file that cannot be read (a failing
        disk) is deleted with a warning, and training starts over."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # whatever makes it unreadable, the training starts over
            log.warning(f"could not read the training checkpoint {self.path} ({error}); the"
                        " trial trains from the start")
            self.discard()
            return None
        self._last, self.saved_epochs = time.monotonic(), state["epoch"]
        return state

    def resumed(self, state: dict) -> None:
        """Hand what the caller kept back to it, once the trainer took up ``state``."""
        self.resumed_after, self.earlier_s = state["epoch"], state["seconds"]
        self.restore(state["kept"], state["epoch"])

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        """Write ``state`` beside the file, then rename it over: a kill mid-write leaves the
        last whole checkpoint."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        seconds = self.earlier_s + time.monotonic() - self._made
        torch.save({**state, "kept": self.keep(), "seconds": seconds}, partial)
        os.replace(partial, self.path)
        self._last, self.saved_epochs = time.monotonic(), state["epoch"]

    def discard(self) -> None:
        self.saved_epochs = None
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".partial").unlink(missing_ok=True)


def checkpoint_path(run_dir: Path, study_name: str, params: Mapping[str, Any]) -> Path:
    """The file a training of these trial parameters keeps its state in: the same for a
    trial and the one queued again in its place. Study names are file-name safe
    (autoshrink.config)."""
    text = json.dumps(sorted(params.items()), default=str)
    return run_dir / FOLDER / study_name / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.pt"


@contextlib.contextmanager
def kept_only_if_interrupted(checkpoint: TrainingCheckpoint, label: str) -> Iterator[None]:
    """Delete ``checkpoint``'s file when the block ends, unless Ctrl-C or SIGTERM ends it
    (a KeyboardInterrupt): the trial queued again in its place goes on from the file, which
    the user is told of, under ``label``."""
    try:
        yield
    except KeyboardInterrupt:
        if checkpoint.saved_epochs is not None:
            log.info(f"{label}  interrupted; its training is saved after epoch"
                     f" {checkpoint.saved_epochs}, and the same command goes on from there")
        raise
    except Exception:
        checkpoint.discard()
        raise
    checkpoint.discard()


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
