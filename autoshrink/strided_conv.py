"""Train strided convolutions without two faults of oneDNN, the CPU's convolution kernels.

Both faults are in the channels_last weight gradient of a convolution with a stride. Each
affected layer gets a forward that computes the same function another way while the trainer
runs; like the ReLU move in ``autoshrink.reorder``, the model a technique, a quantizer or the
export sees is unchanged. Hooks (a pruning mask's, for one) still run: only ``forward`` is
replaced (``autoshrink.forward_swap``).

Few input channels, 1x1 kernel: oneDNN first copies every stride-th pixel into a workspace
("reduce to unit stride"), and that copy writes past the workspace when a group has fewer input
channels than the kernel's channel block (uxlfoundation/oneDNN#6035, open). With PyTorch 2.14.1
on our AMD EPYC cores, a 1x1 stride-2 convolution of 2-15 input channels corrupted the heap on
the first batch of odd size and the process died (float32 and bf16 alike; 16 channels and
more, NCHW, and stride 1 were fine). A search met it in ResNet-18 with Fire blocks of squeeze
ratio 16 (an 8-channel squeeze read by a strided 1x1 expand): the digits training split ends
each epoch on a batch of 61, the worker died, and every resume queued the same plan again and
died with it. Here the layer takes the stride-th pixels first and convolves them with stride 1,
which never reaches that code and runs no slower for these small layers (8 -> 64 channels at
32x32, batch 64: 2.1-2.4 ms against 2.0-7.0 ms).

A stride larger than the input: under bf16 autocast, a convolution whose stride exceeds its
input's height or width (a stride-2 layer reading a 1x1 map) left some of its weight gradient
unwritten, so those taps took whatever the memory held: wrong values in 1 to 40 of 40 steps
for each 3x3 and 5x5 kernel we tried, grouped, depthwise or dense, and now and then NaN (float32
was exact, as were inputs at least as large as the stride). A search met it in torchvision's
MobileNetV3-Small on 8x8 digits, whose later stride-2 depthwise layers read 1x1 maps: the
baseline kept a NaN weight that evaluation never multiplied, and the fixed-point and int8
quantizers of every trial failed on it. Here such a layer convolves with stride 1 and keeps
every stride-th output, the same values; it is checked on every call, as the input's size is
known only then, and costs nothing worth measuring on maps this small.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from autoshrink.forward_swap import Forward, forwards_replaced

CHANNEL_BLOCK = 16  # oneDNN's input-channel block for AVX-512 (AVX2's is 8, below it)


def _few_channel_pointwise(module: nn.Module) -> bool:
    return (_strided_conv(module) and module.kernel_size == (1, 1)
            and module.in_channels // module.groups < CHANNEL_BLOCK)


def _strided_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.stride != (1, 1)
            and module.padding_mode == "zeros")


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    return (0, 0) if conv.padding == "valid" else conv.padding


def _sliced_input_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    pad_h, pad_w = _padding(conv)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    step_h, step_w = conv.stride
    return F.conv2d(x[:, :, ::step_h, ::step_w], conv.weight, conv.bias, groups=conv.groups)


def _sliced_output_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    step_h, step_w = conv.stride
    if x.shape[-2] >= step_h and x.shape[-1] >= step_w:
        return nn.Conv2d.forward(conv, x)
    full = F.conv2d(x, conv.weight, conv.bias, 1, _padding(conv), conv.dilation, conv.groups)
    return full[:, :, ::step_h, ::step_w]


def _fault_free_forward(module: nn.Module, forward: Forward) -> Forward | None:
    if _few_channel_pointwise(module):
        return functools.partial(_sliced_input_forward, module)
    if _strided_conv(module):
        return functools.partial(_sliced_output_forward, module)
    return None


def around_strided_conv_faults(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, every strided convolution of ``model`` runs a forward that avoids
    the faults above; its own forward is back on exit, also when the block raises."""
    return forwards_replaced(model, _fault_free_forward)
