"""What the tests of the trainer's forward replacements (autoshrink.strided_conv,
autoshrink.matmul_conv, autoshrink.depthwise_padding, autoshrink.grouped_conv) share: inputs,
a small training task, and what a layer computes with and without a replacement."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from autoshrink.config import build_config
from autoshrink.data import Split
from autoshrink.plugins import PluginHost
from autoshrink.task import Task, load_task


def channels_last_input(channels: int, height: int, width: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, height, width).contiguous(
        memory_format=torch.channels_last)


def digits_task_of_128_images() -> Task:
    """The default digits task with its training split cut to 128 images: one epoch of a few
    steps, enough to see which forward a layer trains with."""
    task = load_task(build_config(None, {}), PluginHost.discover())
    train = task.splits.train
    return dataclasses.replace(task, splits=dataclasses.replace(
        task.splits, train=Split(train.x[:128], train.y[:128])))


def outputs_and_gradients(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                          swap: Callable[[nn.Module], contextlib.AbstractContextManager] | None
                          ) -> tuple[torch.Tensor, ...]:
    """A copy of ``conv``'s output for ``x`` and the gradients of ``x`` and of its parameters
    for ``grad``, with ``swap(conv)`` around the call where given."""
    conv = copy.deepcopy(conv)
    x = x.clone().requires_grad_()
    with swap(conv) if swap else contextlib.nullcontext():
        out = conv(x)
        out.backward(grad)
    return (out.detach(), x.grad, *(p.grad for p in conv.parameters()))
