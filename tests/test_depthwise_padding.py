"""Depthwise layers on maps shorter than their kernel pad their input ahead while they train
(autoshrink.depthwise_padding): the same outputs and gradients, through oneDNN's fast kernel."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from autoshrink.depthwise_padding import depthwise_layers_padded_ahead
from autoshrink.train import Trainer
from tests.forward_swaps import (
    channels_last_input,
    digits_task_of_128_images,
    outputs_and_gradients,
)


def reads_a_padded_input(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether the layer's output was computed from an input it padded itself."""
    with depthwise_layers_padded_ahead(conv):
        out = conv(x.detach().requires_grad_())
    return any(type(node).__name__ == "ConstantPadNdBackward0"
               for node, _ in out.grad_fn.next_functions if node is not None)


@pytest.mark.parametrize("channels,kernel,padding,height,width,bias", [
    (32, 3, 1, 2, 2, False),  # the ghost modules' cheap 3x3 on a 2x2 map
    (16, 3, 1, 1, 1, True),
    (8, 5, 2, 4, 4, False),
    (8, 5, 2, 2, 2, True),
    (12, 3, 1, 2, 6, False),  # shorter than the kernel, not narrower
    (8, (5, 1), (2, 0), 4, 4, True),  # factorized n x 1
    (16, (3, 1), (1, 0), 1, 1, False),
])
def test_padded_ahead_layers_keep_outputs_and_gradients(channels, kernel, padding, height,
                                                        width, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, kernel, padding=padding, groups=channels, bias=bias)
    x = channels_last_input(channels, height, width)
    assert reads_a_padded_input(conv, x)
    grad = torch.randn_like(conv(x))
    expected = outputs_and_gradients(conv, x, grad, swap=None)
    got = outputs_and_gradients(conv, x, grad, swap=depthwise_layers_padded_ahead)
    for value, want in zip(got, expected, strict=True):
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv,size", [
    (nn.Conv2d(32, 32, 3, padding=1, groups=32), 4),  # the map holds the kernel
    (nn.Conv2d(8, 8, 5, padding=2, groups=8), 5),
    (nn.Conv2d(16, 16, (1, 3), padding=(0, 1), groups=16), 2),  # narrower only: no fault
    (nn.Conv2d(32, 32, 3, padding=1, groups=16), 2),  # grouped, not depthwise
    (nn.Conv2d(16, 32, 3, padding=1, groups=16), 2),  # two outputs per input channel
    (nn.Conv2d(32, 32, 3, padding=1), 2),  # dense (autoshrink.matmul_conv's case)
    (nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32), 2),  # strided
    (nn.Conv2d(32, 32, 3, padding=1, groups=32, padding_mode="reflect"), 2),
])
def test_other_layers_and_maps_as_tall_as_the_kernel_keep_their_own_forward(conv, size):
    assert not reads_a_padded_input(conv, channels_last_input(conv.in_channels, size, size))


def test_a_map_narrower_but_not_shorter_than_the_kernel_keeps_its_own_forward():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert not reads_a_padded_input(conv, channels_last_input(8, 8, 2))
    assert reads_a_padded_input(conv, channels_last_input(8, 2, 8))


def test_a_pruning_mask_still_applies():
    """The mask's hook sets the weight before each forward (a pruned layer cannot be copied
    once it ran, so each side gets a layer of its own from the same seed)."""
    def pruned() -> nn.Conv2d:
        torch.manual_seed(0)
        conv = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        return prune.l1_unstructured(conv, "weight", amount=0.5)

    x = channels_last_input(16, 2, 2)
    grad = torch.randn_like(pruned()(x))
    got, expected = pruned(), pruned()
    for conv, padded_ahead in ((got, True), (expected, False)):
        with depthwise_layers_padded_ahead(conv) if padded_ahead else contextlib.nullcontext():
            conv(x).backward(grad)
    assert reads_a_padded_input(got, x)
    torch.testing.assert_close(got.weight_orig.grad, expected.weight_orig.grad)
    assert (got.weight_orig.grad[got.weight_mask == 0] == 0).all()
    assert (got.weight_orig.grad[got.weight_mask == 1] != 0).any()


def test_the_forward_is_back_on_exit_also_after_an_error():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    with pytest.raises(RuntimeError), depthwise_layers_padded_ahead(conv):
        assert "forward" in vars(conv)
        raise RuntimeError("trial failed")
    assert "forward" not in vars(conv)


def test_the_trainer_pads_ahead_for_depthwise_layers_on_small_maps():
    task = digits_task_of_128_images()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, stride=8, padding=1), nn.ReLU(),  # 2x2 maps
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    outputs = []  # what each training step's output was computed from (evaluation: nothing)
    model[2].register_forward_hook(lambda module, args, out: out.grad_fn and outputs.append(
        {type(node).__name__ for node, _ in out.grad_fn.next_functions if node is not None}))
    before = model[2].weight.detach().clone()
    Trainer(task.splits, task.recipe).fit(model, epochs=1, lr=0.05)
    assert outputs and all("ConstantPadNdBackward0" in names for names in outputs)
    assert not torch.equal(model[2].weight, before)
    assert "forward" not in vars(model[2])
