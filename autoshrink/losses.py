"""Training losses beyond the trainer's plain cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autoshrink.technique import TrainerCallback


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean of -(1 - p_t)^gamma * log p_t (Lin et al.); equals cross-entropy at gamma = 0."""
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
    return (-(1.0 - log_p.exp()).pow(gamma) * log_p).mean()


class FocalLoss(TrainerCallback):
    """Trains on focal loss instead of the trainer's cross-entropy."""

    def __init__(self, gamma: float):
        self.gamma = gamma

    def loss(self, loss, logits, inputs, targets):
        return focal_loss(logits, targets, self.gamma)
