"""A check shared by the tests of the trainer's forward replacements (autoshrink.strided_conv,
autoshrink.depthwise_padding): what a layer computes with and without one."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn


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
