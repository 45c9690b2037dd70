"""Train depthwise convolutions on maps smaller than their kernel on an input padded ahead.

oneDNN, the CPU's convolution kernels, has a fast depthwise weight-gradient kernel for kernels
up to 3 wide, but only for inputs that hold the whole kernel without its padding (its
boundary check asks for an input at least as tall as the kernel). A 3x3 depthwise layer on a
2x2 or 1x1 map fails that check and falls back to a general matrix-product path: on the AMD
EPYC cores without AVX-512 (one thread, batch 64, channels_last) the weight gradient of 32
channels on a 2x2 map took 0.83 ms against 0.09 ms for the same layer on a 4x4 map. Such
layers end every compressed digits CNN with ghost modules (whose cheap 5x5 kernels are cut to
3x3 on 2x2 maps) or depthwise separable convolutions; in one ghost + dwconv model they were
half of the training step. Given a zero-padded input and no padding of its own, the same layer
meets the check and runs the fast kernel: forward and backward together 1146 -> 431 µs (32
channels, 3x3, 2x2 map), 959 -> 373 µs (1x1 map), and for 5x5 kernels, which the fast kernel
never takes, 1002 -> 609 µs (2x2), 868 -> 699 µs (8 channels, 4x4) and 1881 -> 918 µs (24
channels, 4x4). On maps as large as the kernel it lost (3x3 on 4x4 maps: 514 -> 636 µs), so
only layers whose input is smaller than their kernel take this path, decided on each call.

The values are the convolution's own (the padding is the same zeros). As in
``autoshrink.strided_conv``, only ``forward`` is replaced and only while the trainer runs
(``autoshrink.forward_swap``): hooks (a pruning mask's) still run, and the model a technique
or the export sees is unchanged.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from autoshrink.forward_swap import Forward, forwards_replaced


def _depthwise_unit_stride(module: nn.Module) -> bool:
    """A depthwise convolution (one input and one output channel per group) with stride 1,
    no dilation and numeric zero padding."""
    return (type(module) is nn.Conv2d and module.groups > 1
            and module.groups == module.in_channels == module.out_channels
            and module.stride == (1, 1) and module.dilation == (1, 1)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and any(module.padding))


def _padded_ahead_forward(conv: nn.Conv2d, fallback: Forward, x: torch.Tensor) -> torch.Tensor:
    (kernel_h, kernel_w), (pad_h, pad_w) = conv.kernel_size, conv.padding
    if x.shape[-2] >= kernel_h and x.shape[-1] >= kernel_w:
        return fallback(x)
    return F.conv2d(F.pad(x, (pad_w, pad_w, pad_h, pad_h)), conv.weight, conv.bias,
                    groups=conv.groups)


def _small_map_forward(module: nn.Module, forward: Forward) -> Forward | None:
    if not _depthwise_unit_stride(module):
        return None
    return functools.partial(_padded_ahead_forward, module, forward)


def depthwise_layers_padded_ahead(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, ``model``'s depthwise convolutions pad an input smaller than their
    kernel themselves; outside it they are as they were."""
    return forwards_replaced(model, _small_map_forward)
