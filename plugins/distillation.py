"""Knowledge distillation from the trained baseline, seed 001 stage 3 (after Hinton et al.).

Every training run of the trial (the engine's fine-tune or train-from-scratch and any
technique's own fine-tuning, e.g. after pruning) minimises

    (1 - alpha) * student_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

where the teacher is the trained baseline of the task and T the temperature (the T^2 factor
keeps the soft term's gradients on the scale of the hard term's, as Hinton et al. advise). The
student's own loss is cross-entropy or focal loss, -(1 - p_t)^gamma * log p_t; seed 001 trains
its networks with focal loss (gamma = 0.5) and its distilled student with plain cross-entropy
(focal loss with gamma = 0). Temperature, weight, student loss and gamma are search parameters.
The teacher does not run at every step: its logits on the training split are computed once per
search (training does not augment the samples) and each step reads its batch's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from autoshrink import Stage, Technique, hookimpl
from autoshrink.errors import TrialFailed
from autoshrink.losses import focal_loss
from autoshrink.technique import TrainerCallback, check_choice, check_range

STUDENT_LOSSES = ("cross-entropy", "focal")


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    temperature: float = 4.0
    alpha: float = 0.5
    student_loss: str = "cross-entropy"
    gamma: float = 0.5

    def __post_init__(self):
        check_range("distill", "temperature", self.temperature, 1.0, 20.0)
        check_range("distill", "alpha", self.alpha, 0.0, 1.0)
        check_choice("distill", "student_loss", self.student_loss, STUDENT_LOSSES)
        check_range("distill", "gamma", self.gamma, 0.0, 5.0)


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) on temperature-softened distributions, batch mean."""
    return F.kl_div(F.log_softmax(student.float() / temperature, dim=1),
                    F.log_softmax(teacher.float() / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2


class DistillationLoss(TrainerCallback):
    """Replaces the trainer's loss with the distillation objective.

    Gradients are clipped to a total norm of 5 (Hinton et al. do not clip):
    against a confident teacher, T^2 * KL at a high temperature is far sharper than
    cross-entropy, and at the fine-tuning learning rate training oscillated and blew up. The
    digits baseline distilled into a copy of itself (T 6, alpha 0.8, LR 0.02) fell from 97 % to
    10 % validation accuracy or to a NaN loss within 2-5 epochs; clipped, it stays at 97 %.
    """

    max_grad_norm = 5.0

    def __init__(self, teacher: nn.Module, options: DistillOptions,
                 training_outputs: Callable[[nn.Module], torch.Tensor | None] | None = None):
        self.teacher, self.options = teacher, options
        self._training_outputs = training_outputs
        self._batch: torch.Tensor | None = None
        self._device: torch.device | None = None

    def on_batch(self, indices: torch.Tensor) -> None:
        self._batch = indices

    def teacher_logits(self, inputs: torch.Tensor,
                       indices: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's logits for ``inputs``: looked up when ``indices`` say which training
        samples they are (the teacher ran once over the split), otherwise computed."""
        if indices is not None and self._training_outputs is not None:
            outputs = self._training_outputs(self.teacher)
            if outputs is not None:
                return outputs[indices]
        if self._device != inputs.device:  # the shared baseline follows the student once
            self.teacher.to(inputs.device)
            self._device = inputs.device
        with torch.no_grad():
            return self.teacher(inputs)

    def loss(self, loss, logits, inputs, targets):
        indices, self._batch = self._batch, None  # this batch's only: a later loop may not say
        o = self.options
        if o.student_loss == "focal":
            loss = focal_loss(logits, targets, o.gamma)
        if o.alpha == 0.0:
            return loss
        soft = soft_target_loss(logits, self.teacher_logits(inputs, indices), o.temperature)
        return (1.0 - o.alpha) * loss + o.alpha * soft


class Distill(Technique):
    name = "distill"
    stage = Stage.TRAINING
    claims = frozenset({"loss"})
    Options = DistillOptions
    order = 0  # first, so the training techniques' own training runs distil too
    paper = "seed 001 stage 3 (Gabbasov et al.), after Hinton, Vinyals & Dean 2015"

    def search_space(self, trial) -> DistillOptions:
        student_loss = trial.suggest_categorical("student_loss", list(STUDENT_LOSSES))
        return DistillOptions(
            temperature=trial.suggest_float("temperature", 1.0, 8.0, step=1.0),
            alpha=trial.suggest_float("alpha", 0.1, 0.9, step=0.1),
            student_loss=student_loss,
            gamma=(trial.suggest_float("gamma", 0.5, 2.0, step=0.5)
                   if student_loss == "focal" else DistillOptions.gamma))

    def apply(self, model: nn.Module, options: DistillOptions, ctx) -> nn.Module:
        if ctx.teacher is None:
            if ctx.finetune_fn is not None:
                raise TrialFailed("distill needs the trained baseline as its teacher")
            return model  # no data, no training (``inspect``): nothing to distil
        ctx.teacher.eval()
        ctx.add_training_callback(DistillationLoss(ctx.teacher, options,
                                                   ctx.training_outputs))
        return model


@hookimpl
def register_techniques(register):
    register(Distill())
