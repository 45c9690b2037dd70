"""Train strided 1x1 convolutions with few input channels without oneDNN's faulty kernel.

oneDNN computes the weight gradient of a channels_last 1x1 convolution with a stride by first
copying every stride-th pixel into a workspace ("reduce to unit stride"), and that copy writes
past the workspace when a group has fewer input channels than the kernel's channel block
(uxlfoundation/oneDNN#6035, open). With PyTorch 2.14.1 on our AMD EPYC cores, a 1x1 stride-2
convolution of 2-15 input channels corrupted the heap on the first batch of odd size and the
process died (float32 and bf16 alike; 16 channels and more, NCHW, and stride 1 were fine). A
search met it in ResNet-18 with Fire blocks of squeeze ratio 16 (an 8-channel squeeze read by
a strided 1x1 expand): the digits training split ends each epoch on a batch of 61, the worker
died, and every resume queued the same plan again and died with it.

Taking the stride-th pixels first and convolving them with stride 1 is the same function (for
zero padding), and its gradient never reaches that code. It runs no slower for these small
layers (8 -> 64 channels at 32x32, batch 64: 2.1-2.4 ms against 2.0-7.0 ms). Like the ReLU move in
``autoshrink.reorder``, it holds only while the trainer runs: the model a technique, a
quantizer or the export sees is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

CHANNEL_BLOCK = 16  # oneDNN's input-channel block for AVX-512 (AVX2's is 8, below it)


def _affected(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1)
            and module.stride != (1, 1) and module.padding_mode == "zeros"
            and module.in_channels // module.groups < CHANNEL_BLOCK)


def _sliced_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    pad_h, pad_w = (0, 0) if conv.padding == "valid" else conv.padding
    if pad_h or pad_w:
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    step_h, step_w = conv.stride
    return F.conv2d(x[:, :, ::step_h, ::step_w], conv.weight, conv.bias, groups=conv.groups)


@contextlib.contextmanager
def sliced_strided_pointwise(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every affected 1x1 convolution of ``model`` slices its input and
    convolves with stride 1; its own forward is back on exit, also when the block raises.
    Hooks (a pruning mask's, for one) still run: only ``forward`` is replaced."""
    changed = [m for m in model.modules() if _affected(m)]
    for conv in changed:
        conv.forward = functools.partial(_sliced_forward, conv)
    try:
        yield model
    finally:
        for conv in changed:
            del conv.forward
