"""The training recipe and the cores to run it on: settings only, without torch.

Kept apart from the trainer (``autoshrink.train``) so that the command line can read and check
a study's settings, and answer ``--help``, without loading the libraries that train.
"""

from __future__ import annotations

import dataclasses
import os

PRECISIONS = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the baseline is trained and how candidates are fine-tuned."""

    epochs: int = 30
    finetune_epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    finetune_lr: float = 0.02
    precision: str = "auto"  # of training: "float32", "bfloat16", or "auto" (autoshrink.train)


def available_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))
