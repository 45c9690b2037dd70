"""Grouped convolutions compute in float32 while the trainer runs under bf16 autocast on the CPU
(autoshrink.grouped_conv): the values of a float32 convolution, dense layers left to autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from autoshrink.grouped_conv import grouped_convolutions_in_float32
from autoshrink.train import Trainer
from tests.forward_swaps import digits_task_of_128_images


def bf16_outputs_and_gradients(conv: nn.Conv2d, x: torch.Tensor, in_float32: bool):
    """The layer's output under bf16 autocast, with the gradients of its input and weight."""
    x = x.detach().clone().requires_grad_(True)
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if in_float32:
            with grouped_convolutions_in_float32(conv):
                out = conv(x)
        else:
            out = conv(x)
    out.float().square().sum().backward()
    return out, x.grad, conv.weight.grad.clone()


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 8, 5, padding=2, groups=8),  # depthwise
                                  nn.Conv2d(8, 16, 1, groups=4),  # grouped pointwise
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)])
def test_a_grouped_layer_gives_the_float32_convolutions_values_under_bf16_autocast(conv):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 9, 9).to(memory_format=torch.channels_last)
    out, x_grad, weight_grad = bf16_outputs_and_gradients(conv, x, in_float32=True)
    assert out.dtype == torch.float32
    expected = conv._conv_forward(x.requires_grad_(True), conv.weight, conv.bias)
    conv.zero_grad()
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected.detach())
    torch.testing.assert_close(x_grad, x.grad)
    torch.testing.assert_close(weight_grad, conv.weight.grad)
    assert bf16_outputs_and_gradients(conv, x, in_float32=False)[0].dtype == torch.bfloat16


def test_a_bf16_input_is_widened_and_dense_layers_stay_with_autocast():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Conv2d(8, 4, 1))
    dtypes = []
    for layer in model:
        layer.register_forward_hook(lambda module, args, out: dtypes.append(
            (args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16), grouped_convolutions_in_float32(model):
        model(torch.randn(2, 3, 6, 6))
    assert dtypes == [(torch.float32, torch.bfloat16),  # dense: autocast's bf16
                      (torch.bfloat16, torch.float32),  # grouped: the bf16 input in float32
                      (torch.float32, torch.bfloat16)]  # dense again: autocast casts back


def test_a_pruning_mask_still_applies_and_the_forward_is_back_on_exit():
    torch.manual_seed(0)
    conv = prune.l1_unstructured(nn.Conv2d(8, 8, 3, padding=1, groups=8), "weight", amount=0.5)
    x = torch.randn(2, 8, 5, 5)
    with pytest.raises(RuntimeError, match="boom"), grouped_convolutions_in_float32(conv):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        raise RuntimeError("boom")
    assert "forward" not in vars(conv)
    masked = nn.functional.conv2d(x, conv.weight_orig * conv.weight_mask, conv.bias,
                                  padding=1, groups=8)
    torch.testing.assert_close(out, masked)


def installed_forward(module: nn.Module) -> str | None:
    """The name of the forward the trainer gave ``module`` in place of its own, if any."""
    forward = vars(module).get("forward")
    return None if forward is None else getattr(forward, "func", forward).__name__


@pytest.mark.parametrize("bfloat16", [True, False])
def test_the_trainer_runs_grouped_layers_in_float32_when_it_trains_in_bf16(bfloat16):
    task = digits_task_of_128_images()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    seen = {}
    for index in (0, 2):
        model[index].register_forward_hook(
            lambda module, args, out, index=index: seen.setdefault(index, set()).add(
                (out.dtype, installed_forward(module))))
    before = model[2].weight.detach().clone()
    Trainer(task.splits, task.recipe, bfloat16=bfloat16).fit(model, epochs=1, lr=0.05)
    if bfloat16:
        assert seen == {0: {(torch.bfloat16, None)}, 2: {(torch.float32, "in_float32")}}
    else:  # no cast: the depthwise layer has only autoshrink.depthwise_padding's forward
        assert seen == {0: {(torch.float32, None)},
                        2: {(torch.float32, "_padded_ahead_forward")}}
    assert not torch.equal(model[2].weight, before)
    assert "forward" not in vars(model[2])
