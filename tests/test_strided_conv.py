"""Strided convolutions trained around oneDNN's faults (autoshrink.strided_conv): the layers
that need it get a forward with the same outputs and gradients, only while the block runs."""

from __future__ import annotations

import copy
import functools
import subprocess
import sys

import pytest
import torch
from torch import nn

from autoshrink.strided_conv import around_strided_conv_faults
from tests.forward_swaps import outputs_and_gradients

STRIDED_POINTWISE_TRAINING = """
import torch
from torch import nn
from autoshrink.config import build_config
from autoshrink.plugins import PluginHost
from autoshrink.task import load_task
from autoshrink.train import Trainer

task = load_task(build_config(None, {}), PluginHost.discover())
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 32, 1, stride=2),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
Trainer(task.splits, task.recipe).fit(model, epochs=3, lr=0.05)
assert "forward" not in vars(model[2])
print("trained")
"""


def test_a_strided_1x1_convolution_of_few_channels_trains_on_an_odd_last_batch():
    """oneDNN's gradient of such a layer in channels_last overran its buffer and killed the
    process; the digits split ends each epoch on 61 images. In a fresh interpreter, so that a
    crash fails this test rather than the suite."""
    result = subprocess.run([sys.executable, "-c", STRIDED_POINTWISE_TRAINING],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["trained"], (
        result.returncode, result.stderr[-2000:])


@pytest.mark.parametrize("in_channels,groups,kernel,stride,padding,size", [
    (8, 1, 1, 2, 0, 15),  # few channels, 1x1: the input is sliced (odd: the last row is read)
    (3, 1, 1, 2, 1, 15),
    (16, 4, 1, 2, 0, 15),
    (8, 1, 1, 2, "valid", 15),
    (16, 16, 3, 2, 1, 1),  # a stride beyond the input: the output is sliced
    (16, 16, 5, 2, 2, 1),
    (32, 1, 3, 3, 1, 2),
    (32, 4, 3, (2, 1), 1, 1),
    (32, 32, 3, 2, 1, 8),  # an input as large as the stride: its own forward
])
def test_strided_convolutions_keep_outputs_and_gradients(in_channels, groups, kernel, stride,
                                                         padding, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, 32, kernel, stride=stride, padding=padding, groups=groups)
    x = torch.randn(4, in_channels, size, size)
    grad = torch.randn_like(conv(x))
    expected = outputs_and_gradients(conv, x, grad, swap=None)
    for got, want in zip(outputs_and_gradients(conv, x, grad, swap=around_strided_conv_faults),
                         expected, strict=True):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_the_forward_is_restored_also_when_training_raises():
    conv = nn.Conv2d(8, 32, 1, stride=2)
    with pytest.raises(RuntimeError), around_strided_conv_faults(conv):
        assert "forward" in vars(conv)
        raise RuntimeError("trial failed")
    assert "forward" not in vars(conv)  # its own forward again


def test_bf16_weight_gradients_of_a_stride_beyond_the_input_are_right():
    """Under bf16 autocast, oneDNN left taps of such a layer's weight gradient unwritten: a
    depthwise 3x3 stride-2 layer on 1x1 maps got wrong values in 38 of 40 steps (now and
    then NaN), enough to ruin the weights a quantizer reads."""
    torch.manual_seed(0)
    reference = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
    conv = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    for batch in (64, 61) * 20:
        x = torch.randn(batch, 16, 1, 1)
        reference.weight.grad = conv.weight.grad = None
        out = reference(x)
        grad = torch.randn_like(out)
        out.backward(grad)
        with torch.autocast("cpu", dtype=torch.bfloat16), around_strided_conv_faults(conv):
            conv(x.contiguous(memory_format=torch.channels_last)).float().backward(grad)
        error = (conv.weight.grad - reference.weight.grad).abs().max()
        assert error <= 0.05 * reference.weight.grad.abs().max(), error


def test_only_strided_convolutions_with_zero_padding_get_another_forward():
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, stride=2),
                          nn.Conv2d(16, 8, 1, stride=2), nn.Conv2d(32, 8, 1, stride=2, groups=4),
                          nn.Conv2d(8, 8, 1, stride=2, padding=1, padding_mode="reflect"),
                          nn.Conv2d(8, 8, 3))
    with around_strided_conv_faults(model):
        forwards = [vars(m).get("forward") for m in model]
        kinds = [f.func.__name__ if isinstance(f, functools.partial) else None
                 for f in forwards]
    assert kinds == [None, "_sliced_output_forward", "_sliced_output_forward",
                     "_sliced_input_forward", None, None]
