"""Train wide convolutions on small maps as one matrix product each.

oneDNN's convolution kernels run far below the machine's matrix-multiplication rate when the
output map is only a few pixels wide, the weight gradient's kernel most of all (by
``ONEDNN_VERBOSE``, 13-16 ms of the layer's 20 ms backward pass below). On the Intel Xeon cores
with AMX (two threads, batch 64, bf16 autocast) a 3x3 convolution of 512 to 512 channels on a
2x2 map took 32 ms forward and backward, 4.5 ms as matrix products; on a 4x4 map 32 against 13
ms (docs/performance.md has the table). The last blocks of VGG and ResNet on 32x32 images are
such layers: in bf16 they took about half of VGG-11's training step.

Here such a layer gathers its receptive fields into a matrix of ``N * H_out * W_out`` rows (the
im2col layout, built from the channels_last input with one shifted slice per kernel tap) and
multiplies it with the weight; the backward pass is two more products and a scatter of the
columns' gradient back onto the input. The values are those of the convolution up to rounding.
As with ``autoshrink.strided_conv``, only ``forward`` is replaced and only while the trainer
runs (``autoshrink.forward_swap``): hooks still run, and the model a technique or the export
sees is unchanged. Whether a
call takes this path is decided on each call, as the input's size is known only then; under
bf16 autocast only on CPUs with AMX (``_cpu_has_amx``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from autoshrink.cpu_features import has_amx
from autoshrink.forward_swap import Forward, forwards_replaced, zero_padded_conv

# measured on the Intel Xeon cores with AMX, two threads, steps of 64 (docs/performance.md):
MAX_OUTPUT_PIXELS = 16  # 4x4 maps and smaller; at 8x8 oneDNN was up to 1.7x faster
MIN_IN_CHANNELS = 256  # from 128 input channels down, oneDNN was as fast or faster in float32


def _eligible(module: nn.Module) -> bool:
    """A plain dense convolution of many input channels with numeric zero padding."""
    return (zero_padded_conv(module) and module.groups == 1
            and module.in_channels >= MIN_IN_CHANNELS)


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _tap_slices(kernel: tuple[int, int], stride: tuple[int, int], out_size: tuple[int, int]):
    """For every kernel tap, the rows and columns of the padded input it reads."""
    (kh, kw), (sh, sw), (h, w) = kernel, stride, out_size
    return [(slice(i, i + sh * (h - 1) + 1, sh), slice(j, j + sw * (w - 1) + 1, sw))
            for i in range(kh) for j in range(kw)]


class _ConvAsMatmul(torch.autograd.Function):
    """A dense convolution as ``columns @ weight.T``; inputs and weight of one dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        n, c, height, width = x.shape
        out_channels, _, kh, kw = weight.shape
        (sh, sw), (ph, pw) = stride, padding
        out_size = (_output_size(height, kh, sh, ph), _output_size(width, kw, sw, pw))
        padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # N, H, W, C
        taps = _tap_slices((kh, kw), stride, out_size)
        columns = torch.cat([padded[:, rows, cols, :] for rows, cols in taps], dim=3)
        columns = columns.view(n * out_size[0] * out_size[1], kh * kw * c)
        # the weight's taps in the columns' order; a channels_last weight needs no copy
        matrix = weight.permute(0, 2, 3, 1).reshape(out_channels, kh * kw * c)
        # written into a channels_last tensor of its own, not returned as a view of the
        # product: autograd forbids in-place changes (an in-place ReLU, a residual +=) to views
        # made inside a custom Function
        out = torch.empty((n, out_channels, *out_size), dtype=columns.dtype, device=x.device,
                          memory_format=torch.channels_last)
        out_rows = out.permute(0, 2, 3, 1).view(-1, out_channels)  # one row per output pixel
        if bias is None:
            torch.mm(columns, matrix.t(), out=out_rows)
        else:
            torch.addmm(bias, columns, matrix.t(), out=out_rows)
        ctx.save_for_backward(columns, matrix)
        ctx.geometry = (padded.shape, padding, weight.shape, taps, out_size)
        return out

    @staticmethod
    def backward(ctx, grad):
        columns, matrix = ctx.saved_tensors
        padded_shape, (ph, pw), weight_shape, taps, out_size = ctx.geometry
        n, padded_height, padded_width, c = padded_shape
        out_channels, _, kh, kw = weight_shape
        grad = grad.permute(0, 2, 3, 1).reshape(n * out_size[0] * out_size[1], out_channels)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_columns = (grad @ matrix).view(n, *out_size, kh * kw, c)
            # summed in float32: a pixel read by several taps would round once per tap in bf16
            padded = torch.zeros(padded_shape, device=grad.device,
                                 dtype=torch.promote_types(grad.dtype, torch.float32))
            for tap, (rows, cols) in enumerate(taps):
                padded[:, rows, cols, :] += grad_columns[:, :, :, tap, :]
            grad_x = (padded[:, ph:padded_height - ph, pw:padded_width - pw, :]
                      .to(grad.dtype).permute(0, 3, 1, 2))
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.t() @ columns).view(out_channels, kh, kw, c).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[2]:  # False when there is no bias
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias, None, None


@functools.cache
def _cpu_has_amx() -> bool:
    """Whether this CPU multiplies bf16 matrices on AMX tiles. Without them the bf16 products
    lost to oneDNN on 4x4 maps (0.73-0.84x with oneDNN held to AVX-512 BF16 by
    ``ONEDNN_MAX_CPU_ISA``), so under autocast they run only on AMX; float32 gained either way."""
    return has_amx()


def _small_map_forward(conv: nn.Conv2d, fallback: Forward, x: torch.Tensor) -> torch.Tensor:
    out_pixels = 1
    for size, kernel, stride, padding in zip(x.shape[-2:], conv.kernel_size, conv.stride,
                                             conv.padding):
        out_pixels *= _output_size(size, kernel, stride, padding)
    if x.dim() != 4 or not 0 < out_pixels <= MAX_OUTPUT_PIXELS:
        return fallback(x)
    weight, bias = conv.weight, conv.bias
    if torch.is_autocast_enabled(x.device.type):  # what F.conv2d would compute in
        if x.device.type == "cpu" and not _cpu_has_amx():
            return fallback(x)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _ConvAsMatmul.apply(x, weight, bias, conv.stride, conv.padding)


def _matmul_forward(module: nn.Module, forward: Forward) -> Forward | None:
    return functools.partial(_small_map_forward, module, forward) if _eligible(module) else None


def small_map_convolutions_as_matmul(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, every wide dense convolution of ``model`` runs as a matrix product
    whenever its output map has at most ``MAX_OUTPUT_PIXELS`` pixels, and as before otherwise
    (``autoshrink.strided_conv``'s forward, if its block encloses this one); each module's
    forward is back on exit, also when the block raises."""
    return forwards_replaced(model, _matmul_forward)
