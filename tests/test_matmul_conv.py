"""Wide convolutions on small maps trained as matrix products (autoshrink.matmul_conv): the same
outputs and gradients as the convolution, only for the layers and calls the rule picks, and only
while the block runs."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from autoshrink import matmul_conv
from autoshrink.matmul_conv import MIN_IN_CHANNELS, small_map_convolutions_as_matmul
from autoshrink.strided_conv import around_strided_conv_faults
from autoshrink.train import Trainer
from tests.forward_swaps import channels_last_input, digits_task_of_128_images

WIDE = MIN_IN_CHANNELS


def outputs_and_gradients(conv: nn.Conv2d | Callable[[], nn.Conv2d], x: torch.Tensor,
                          as_matmul: bool,
                          autocast: bool = False) -> tuple[tuple[torch.Tensor, ...], str]:
    """The output, the input's and parameters' gradients, and the output's grad_fn name, of a
    copy of ``conv`` or of a new one it makes (a pruned layer cannot be deep-copied)."""
    conv = copy.deepcopy(conv) if isinstance(conv, nn.Module) else conv()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if as_matmul:
            with small_map_convolutions_as_matmul(conv):
                out = conv(x)
        else:
            out = conv(x)
    (out.float() ** 2).sum().backward()  # a gradient that depends on the output
    return (out.detach(), x.grad, *(p.grad for p in conv.parameters())), type(out.grad_fn).__name__


@pytest.mark.parametrize("out_channels,kernel,stride,padding,size,bias", [
    (8, 3, 1, 1, (2, 2), True),  # VGG's last blocks on 32x32 images
    (8, 3, 1, 1, (4, 4), False),
    (8, 3, 2, 1, (8, 8), True),  # ResNet's strided block entry, a 4x4 output
    (8, 3, 2, 1, (1, 1), True),  # a stride larger than the input (autoshrink.strided_conv)
    (8, 1, 2, 0, (7, 7), True),  # a strided 1x1 shortcut on an odd map
    (8, (3, 1), 1, (1, 0), (3, 5), True),  # a rectangular kernel and map
    (8, 5, 1, 2, (1, 1), False),  # more padding than map
])
def test_matrix_products_give_the_convolutions_outputs_and_gradients(
        out_channels, kernel, stride, padding, size, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(WIDE, out_channels, kernel, stride, padding, bias=bias).to(
        memory_format=torch.channels_last)
    x = channels_last_input(WIDE, *size)
    expected, expected_kind = outputs_and_gradients(conv, x, as_matmul=False)
    actual, kind = outputs_and_gradients(conv, x, as_matmul=True)
    assert (kind, expected_kind) == ("_ConvAsMatmulBackward", "ConvolutionBackward0")
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert actual[0].is_contiguous(memory_format=torch.channels_last)


def test_under_bf16_autocast_they_compute_in_bf16_as_the_convolution_does(monkeypatch):
    monkeypatch.setattr(matmul_conv, "_cpu_has_amx", lambda: True)  # whatever runs the test
    torch.manual_seed(0)
    conv = nn.Conv2d(WIDE, 16, 3, padding=1).to(memory_format=torch.channels_last)
    x = channels_last_input(WIDE, 4, 4, batch=8)
    exact, _ = outputs_and_gradients(conv, x, as_matmul=False)
    expected, _ = outputs_and_gradients(conv, x, as_matmul=False, autocast=True)
    actual, kind = outputs_and_gradients(conv, x, as_matmul=True, autocast=True)
    assert kind == "_ConvAsMatmulBackward"
    for got, want, truth in zip(actual, expected, exact, strict=True):
        assert got.dtype == want.dtype  # bf16 output, float32 gradients of float32 leaves
        scale = truth.abs().max()
        # no further from the float32 values than oneDNN's bf16 kernels, with some slack
        assert (got.float() - truth).abs().max() <= 2 * (want.float() - truth).abs().max() + (
            1e-3 * scale)


def test_without_amx_bf16_autocast_stays_with_the_convolution(monkeypatch):
    monkeypatch.setattr(matmul_conv, "_cpu_has_amx", lambda: False)
    conv = nn.Conv2d(WIDE, 8, 3, padding=1)
    x = channels_last_input(WIDE, 2, 2)
    assert outputs_and_gradients(conv, x, as_matmul=True, autocast=True)[1] == (
        "ConvolutionBackward0")
    assert outputs_and_gradients(conv, x, as_matmul=True)[1] == "_ConvAsMatmulBackward"


@pytest.mark.parametrize("conv,size", [
    (nn.Conv2d(WIDE, 8, 3, padding=1), (5, 5)),  # 25 output pixels: oneDNN is faster there
    (nn.Conv2d(WIDE // 2, 8, 3, padding=1), (2, 2)),  # too few input channels
    (nn.Conv2d(WIDE, WIDE, 3, padding=1, groups=2), (2, 2)),
    (nn.Conv2d(WIDE, 8, 3, padding=2, dilation=2), (2, 2)),
    (nn.Conv2d(WIDE, 8, 3, padding=1, padding_mode="reflect"), (2, 2)),
    (nn.Conv2d(WIDE, 8, 3, padding="same"), (2, 2)),
])
def test_other_convolutions_and_larger_maps_stay_with_the_convolution(conv, size):
    outputs, kind = outputs_and_gradients(conv, channels_last_input(conv.in_channels, *size),
                                          as_matmul=True)
    assert kind == "ConvolutionBackward0"
    assert outputs[0].shape[0] == 3


def test_a_convolution_subclass_keeps_its_own_forward():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    conv = Scaled(WIDE, 8, 3, padding=1)
    x = channels_last_input(WIDE, 2, 2)
    with small_map_convolutions_as_matmul(conv):
        assert "forward" not in vars(conv)
        torch.testing.assert_close(conv(x), 2 * nn.Conv2d.forward(conv, x))


def test_hooks_still_run_and_a_pruning_mask_still_applies():
    def pruned_conv() -> nn.Conv2d:
        torch.manual_seed(0)
        return prune.l1_unstructured(nn.Conv2d(WIDE, 8, 3, padding=1), "weight", amount=0.5)

    x = channels_last_input(WIDE, 2, 2)
    expected, _ = outputs_and_gradients(pruned_conv, x, as_matmul=False)
    actual, kind = outputs_and_gradients(pruned_conv, x, as_matmul=True)
    assert kind == "_ConvAsMatmulBackward"
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    _, _, bias_grad, weight_orig_grad = actual  # parameters: bias, weight_orig
    assert bias_grad.shape == (8,)
    assert (weight_orig_grad[pruned_conv().weight_mask == 0] == 0).all()  # pruned taps stay


def test_the_forward_before_is_back_on_exit_also_after_an_error():
    model = nn.Sequential(nn.Conv2d(WIDE, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3))
    with around_strided_conv_faults(model):
        strided_forward = vars(model[0])["forward"]
        with pytest.raises(RuntimeError, match="boom"), small_map_convolutions_as_matmul(model):
            assert vars(model[0])["forward"] is not strided_forward
            assert "forward" not in vars(model[1])  # too narrow
            raise RuntimeError("boom")
        assert vars(model[0])["forward"] is strided_forward
    assert "forward" not in vars(model[0])


def test_on_a_larger_map_the_forward_installed_before_serves_the_call():
    conv = nn.Conv2d(WIDE, 8, 3, stride=2, padding=1)
    calls = []
    with around_strided_conv_faults(conv):
        strided_forward = conv.forward
        conv.forward = lambda x: calls.append(x.shape) or strided_forward(x)
        with small_map_convolutions_as_matmul(conv):
            conv(channels_last_input(WIDE, 16, 16))  # an 8x8 output
            conv(channels_last_input(WIDE, 8, 8))  # a 4x4 output
    assert calls == [(3, WIDE, 16, 16)]


def test_the_trainer_trains_wide_layers_on_small_maps_as_matrix_products():
    task = digits_task_of_128_images()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, WIDE, 3, stride=4, padding=1), nn.ReLU(),  # 4x4 or less
                          nn.Conv2d(WIDE, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10))
    kinds = []
    model[2].register_forward_hook(
        lambda module, args, out: kinds.append(type(out.grad_fn).__name__))
    before = model[2].weight.detach().clone()
    Trainer(task.splits, task.recipe).fit(model, epochs=1, lr=0.05)
    assert set(kinds) == {"_ConvAsMatmulBackward"}
    assert not torch.equal(model[2].weight, before)
    assert "forward" not in vars(model[2])


@pytest.mark.parametrize("in_place", [nn.ReLU(inplace=True), lambda out: out.add_(1.0)])
def test_the_output_can_be_changed_in_place(in_place):
    """An in-place ReLU or a residual ``+=`` right after the layer (autograd refuses in-place
    changes to a view that a custom Function returns)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(WIDE, 8, 3, padding=1)
    x = channels_last_input(WIDE, 2, 2)
    with small_map_convolutions_as_matmul(conv):
        out = in_place(conv(x))
    out.sum().backward()
    expected = in_place(nn.Conv2d.forward(conv, x).detach())
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-4)
    assert conv.weight.grad is not None
