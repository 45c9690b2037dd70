"""Early abort: stop training a candidate that can no longer plausibly meet the budget.

Optuna's pruners do not work for multi-objective studies, so the engine checks itself. From the
middle of every training run of a trial (its fine-tune, or a technique's own fine-tunes), the
validation accuracy after each epoch is compared with the budget's floor (baseline accuracy minus
``max_drop``) less an allowance for what the rest of the run may still gain: ``ALLOWANCE`` at
the half, shrinking linearly towards nothing at the last epoch. A trial below that line is
stopped and recorded as pruned with the reason. The last epoch is not checked: a run that
finished is measured and recorded, feasible or not, so the sampler and the plots see it.
Under the one-cycle schedule accuracy climbs most in the last epochs, so the allowance is wide;
``benchmarks/default_search.py`` reports how many trials it stopped.

A check first measures a part of the validation split (its first ``VALIDATION_PART`` samples;
the split is in random order) and measures all of it only when the part leaves the decision in
doubt: with Fashion-MNIST's 12,000 validation images, evaluation, mostly these checks, took a
third of a proxy trial's time. When the trainer measured that part this epoch anyway (a fit
with patience compares its epochs on it), the check starts from its figure.

Before it stops a model with batch norm, a check asks again with the layers' statistics measured
on the current weights (``STATISTICS_SAMPLES`` training images): mid-run, at the one-cycle
schedule's high rates, the running averages lag the weights. VGG-19 rewritten by slim-stem,
slim-before-gap, dwconv and grouped-pointwise read 16.7 % after epoch 3 of its 5 with running
statistics and 99.0 % with measured ones; it was stopped, and trained to the end it scored
98.6 %. The measured statistics are kept: training normalises with batch statistics, so only
evaluations read them, and they describe the weights better than the lagging ones. A model whose
averages always lag (a small momentum, ``autoshrink.batch_norm``) is not asked again: the
trainer measures its statistics on the whole training split before every evaluation of it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from torch import nn

from autoshrink.batch_norm import has_batch_norm
from autoshrink.data import Split
from autoshrink.errors import TrialAborted
from autoshrink.train import VALIDATION_PART, Trainer

START = 0.5  # fraction of a training run before the first check
ALLOWANCE = 0.25  # accuracy a half-trained candidate may still gain (0.25 = 25 pp)
DOUBT = 3  # standard errors of the part's estimate within which the whole split decides
# how far from the line an estimate on the part must be to decide (its standard error at p = 0.5)
DECISIVE = DOUBT * 0.5 / math.sqrt(VALIDATION_PART)
STATISTICS_SAMPLES = 2048  # training images batch norm statistics are measured on, to ask again


@dataclasses.dataclass
class EarlyAbort:
    """An epoch monitor for :meth:`Trainer.fit`; ``curve`` keeps what it measured."""

    trainer: Trainer
    val: Split
    floor: float  # the lowest validation accuracy (in [0, 1]) that meets the budget
    curve: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)

    def __call__(self, model: nn.Module, epoch: int, epochs: int,
                 part_accuracy: float | None = None) -> None:
        """``part_accuracy``: the accuracy of the split's first ``VALIDATION_PART`` samples,
        where the trainer measured it this epoch."""
        progress = epoch / epochs
        if progress < START or epoch == epochs:  # a finished run is measured, not aborted
            return
        line = self.floor - ALLOWANCE * (1 - progress) / (1 - START)
        accuracy = self._measure(model, line, part_accuracy)
        if accuracy < line and self._statistics_may_lag(model):
            accuracy = self._with_measured_statistics(model, line)
        self.curve.append((epoch, epochs, accuracy))
        if accuracy < line:
            raise TrialAborted(
                f"validation accuracy {accuracy * 100:.2f}% after epoch {epoch}/{epochs} is below"
                f" {line * 100:.2f}%: it cannot plausibly reach the budget floor"
                f" {self.floor * 100:.2f}%")

    @functools.cached_property
    def _part(self) -> Split:
        """The validation samples a check reads first (the split itself when no larger)."""
        return self.val.head(VALIDATION_PART)

    def _statistics_may_lag(self, model: nn.Module) -> bool:
        """Whether ``model`` was just evaluated with running batch norm averages; not when the
        trainer measured its statistics on the whole training split before the evaluation."""
        return (has_batch_norm(model)
                and not self.trainer.measures_statistics_before_evaluating(model))

    def _with_measured_statistics(self, model: nn.Module, line: float) -> float:
        """Validation accuracy after the batch norm statistics are measured again on the
        current weights (see the module)."""
        self.trainer.measure_statistics(model, STATISTICS_SAMPLES)
        return self._measure(model, line)

    def _measure(self, model: nn.Module, line: float,
                 part_accuracy: float | None = None) -> float:
        """Validation accuracy from the part (measured unless ``part_accuracy`` gives it) when
        the part is the whole split or its estimate is clearly on one side of ``line`` (more
        than ``DECISIVE`` away), else from the whole split."""
        estimate = (self.trainer.accuracy(model, self._part) if part_accuracy is None
                    else part_accuracy)
        if self._part is self.val or abs(estimate - line) > DECISIVE:
            return estimate
        return self.trainer.accuracy(model, self.val)
