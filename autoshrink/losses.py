"""Training losses beyond the trainer's plain cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autoshrink.technique import TrainerCallback


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean of -(1 - p_t)^gamma * log p_t (Lin et al.); equals cross-entropy at gamma = 0.

    1 - p_t is kept above 1e-12: for gamma < 1 the derivative of x^gamma is infinite at 0, and a
    sample classified with p_t = 1.0 in float32 would turn the whole batch's gradient into NaN.
    """
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
    return (-(1.0 - log_p.exp()).clamp_min(1e-12).pow(gamma) * log_p).mean()


class FocalLoss(TrainerCallback):
    """Trains on focal loss instead of the trainer's cross-entropy."""

    def __init__(self, gamma: float):
        self.gamma = gamma

    def loss(self, loss, logits, inputs, targets):
        return focal_loss(logits, targets, self.gamma)
