"""Under bf16 autocast on the CPU, train grouped convolutions in float32.

oneDNN, the CPU's convolution kernels, gains from bf16 on dense convolutions but loses on
grouped ones. On the Intel Xeon cores with AMX (one thread, batch 64, channels_last, forward and
backward) a depthwise 5x5 convolution of 8 channels on a 28x28 map took 14.6 ms in bf16 against
3.9 ms in float32 (3.7x slower), depthwise 3x3 layers of 32-256 channels 1.1-1.8x slower and
grouped 1x1 layers 1.0-1.2x, while dense 3x3 layers of 16-64 channels ran 1.5-2.9x faster
(docs/performance.md has the table). A search's compressed models are full of grouped layers
(depthwise separable convolutions, ghost modules' cheap operations, grouped pointwise layers),
and a study whose baseline trains in bf16 trains every trial in bf16: Fashion-MNIST models with
ghost modules, depthwise layers and squeeze-excitation took 22-29 ms a step in bf16 against
11-16 ms in float32.

Here such a layer casts its input to float32 and convolves with autocast off; the next dense
layer casts back to bf16 as autocast does anyway. As in ``autoshrink.strided_conv``, only
``forward`` is replaced and only while the trainer runs (``autoshrink.forward_swap``), so hooks
(a pruning mask's) still run and the model a technique or the export sees is unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from autoshrink.forward_swap import Forward, forwards_replaced


def _float32_forward(module: nn.Module, forward: Forward) -> Forward | None:
    if not (isinstance(module, nn.Conv2d) and module.groups > 1):
        return None

    def in_float32(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float())
    return in_float32


def grouped_convolutions_in_float32(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, ``model``'s grouped and depthwise convolutions compute in float32
    whatever autocast asks; outside it they are as they were."""
    return forwards_replaced(model, _float32_forward)
