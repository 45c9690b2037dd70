"""Batch norm running statistics that describe the trained weights, not their history.

A batch norm layer evaluates with running averages of the batch statistics it saw in training,
each batch weighted by its ``momentum``. Models ported from Keras or TensorFlow use a small
momentum (torchvision's MobileNetV3: 0.01), which suits a million ImageNet steps but not a
search's short runs on small splits: trained 8 epochs on digits (18 steps each), MobileNetV3-Small
reached 94 % validation accuracy with batch statistics and 9.7 % with its running ones, which still
held a quarter of their initial zeros and ones. The baseline was refused as not learned, and
every fine-tune, measured the same way, would have looked like a collapse.

When the last epoch weighs less than half of a layer's running statistics (a small momentum,
``momentum=None``'s average over all of training, or an epoch of one or two steps), the trainer
measures them again on the finished weights before it evaluates: one forward pass over the
training split in training mode, without gradients, averaging every batch equally. This is the
usual remedy (often called BN re-estimation) and the layers' momentum is kept for later training.
The default models (momentum 0.1, at least 18 steps an epoch on digits) never need it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from autoshrink.data import Split

LAST_EPOCH_SHARE = 0.5  # the least weight the last epoch must hold in the running statistics


def _tracking_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [module for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.track_running_stats]


def last_epoch_share(momentum: float | None, steps_per_epoch: int) -> float:
    """The weight of the last epoch's batches in running statistics kept with ``momentum``
    (None: an average over all of training, where the last epoch's share is at most one)."""
    if momentum is None:
        return 0.0
    return 1.0 - (1.0 - momentum) ** steps_per_epoch


def has_stale_statistics(model: nn.Module, steps_per_epoch: int) -> bool:
    """Whether some batch norm layer of ``model`` evaluates mostly with statistics of weights
    older than the last epoch's."""
    return any(last_epoch_share(layer.momentum, steps_per_epoch) < LAST_EPOCH_SHARE
               for layer in _tracking_layers(model))


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` evaluates with running statistics of some batch norm layer."""
    return bool(_tracking_layers(model))


@torch.no_grad()
def reestimate_statistics(model: nn.Module, train: Split, batch_size: int,
                          device: torch.device, limit: int | None = None) -> None:
    """Measure every batch norm layer's running statistics again on the training split (its
    first ``limit`` batches), each full batch (or the whole split, when smaller than one)
    weighted equally."""
    layers = _tracking_layers(model)
    with _cumulative_averages(layers):
        was_training = model.training
        model.train()
        for x in train.full_batches(batch_size, limit):
            model(x.to(device).contiguous(memory_format=torch.channels_last))
        model.train(was_training)


@contextlib.contextmanager
def _cumulative_averages(layers: list[nn.modules.batchnorm._BatchNorm]):
    """Reset the layers' statistics and average batches equally while inside; the layers'
    momentum is restored on exit."""
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    try:
        yield
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
