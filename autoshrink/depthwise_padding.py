"""Train depthwise convolutions on maps shorter than their kernel on an input padded ahead.

oneDNN, the CPU's convolution kernels, has a fast depthwise weight-gradient kernel for kernels
up to 3 wide, but only for inputs at least as tall as the kernel without its padding (its
boundary check looks at the height alone). A 3x3 depthwise layer on a 2x2 or 1x1 map fails
that check and falls back to a general matrix-product path: on the AMD EPYC cores without
AVX-512 (one thread, batch 64, channels_last) the weight gradient of 32 channels on a 2x2 map
took 0.83 ms against 0.09 ms for the same layer on a 4x4 map. Such layers end most compressed
digits CNNs with ghost modules (whose cheap 5x5 kernels are cut to 3x3 on 2x2 maps) or
depthwise separable convolutions. Given a zero-padded input and no padding of its own, the
same layer meets the check and runs the fast kernel. Forward and backward together: 3x3, 32
channels, 2x2 map 1,146 -> 431 us, 1x1 map 959 -> 373 us, 2x8 map 1,122 -> 469 us; factorized
3x1 and 5x1 layers on 1x1-4x4 maps 1.2-2.4x faster; 5x5 kernels, which the fast kernel never
takes, 1,002 -> 609 us on a 2x2 map and 868 -> 699 us on 4x4. Where the map is only narrower
than the kernel (a 1x3 layer on a 2x2 map, 3x3 on 8x2) or at least as tall (3x3 on 4x4) it
lost 10-50 %, so only a layer whose input is shorter than its kernel takes this path, decided
on each call.

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

from autoshrink.forward_swap import Forward, forwards_replaced, zero_padded_conv


def _depthwise_unit_stride(module: nn.Module) -> bool:
    """A depthwise convolution (one input and one output channel per group) with stride 1,
    no dilation and numeric zero padding."""
    return (zero_padded_conv(module) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels
            and module.stride == (1, 1) and any(module.padding))


def _padded_ahead_forward(conv: nn.Conv2d, fallback: Forward, x: torch.Tensor) -> torch.Tensor:
    pad_h, pad_w = conv.padding
    if x.shape[-2] >= conv.kernel_size[0]:
        return fallback(x)
    return F.conv2d(F.pad(x, (pad_w, pad_w, pad_h, pad_h)), conv.weight, conv.bias,
                    groups=conv.groups)


def _short_map_forward(module: nn.Module, forward: Forward) -> Forward | None:
    if not _depthwise_unit_stride(module):
        return None
    return functools.partial(_padded_ahead_forward, module, forward)


def depthwise_layers_padded_ahead(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, ``model``'s depthwise convolutions pad an input shorter than their
    kernel themselves; outside it they are as they were."""
    return forwards_replaced(model, _short_map_forward)
