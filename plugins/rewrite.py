"""Helpers the architecture techniques share: module replacement and channel narrowing.

Narrowing keeps the strongest filters (largest L1 norm), so a slimmed layer starts from the
trained baseline's most important weights instead of from scratch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def replace_modules(model: nn.Module, select: Callable[[nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule that ``select`` picks by ``make(module)``; returns how many.

    New modules are not visited again, so ``make`` may return modules ``select`` would pick.
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if select(child):
                setattr(parent, name, make(child))
                count += 1
    return count


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """Every convolution and linear layer: the weights pruning and quantizers act on."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def is_plain_conv(module: nn.Module, kernel: str = "any") -> bool:
    """An ordinary (ungrouped) Conv2d; ``kernel`` 'spatial' (k > 1) or 'pointwise' (1x1)."""
    if type(module) is not nn.Conv2d or module.groups != 1:
        return False
    if kernel == "spatial":
        return module.kernel_size != (1, 1)
    if kernel == "pointwise":
        return module.kernel_size == (1, 1)
    return True


PLAIN_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout)


def plain_units(model: nn.Module, allowed: tuple[type, ...] = PLAIN_LAYERS) -> list[int] | None:
    """Positions of the convolutions in a plain features stack (of ``allowed`` layers), or None
    if it is not one."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not hasattr(model, "classifier"):
        return None
    if not all(isinstance(m, allowed) for m in features):
        return None
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    if any(features[i].groups != 1 for i in convs):
        return None
    return convs


def strongest_filters(conv: nn.Conv2d, keep: int) -> torch.Tensor:
    """Indices (sorted) of the ``keep`` output filters with the largest L1 norm."""
    norms = conv.weight.detach().abs().flatten(1).sum(1)
    return norms.topk(keep).indices.sort().values


def conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int,
              groups: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, groups=groups or conv.groups, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode)


@torch.no_grad()
def select_out(conv: nn.Conv2d, index: torch.Tensor) -> nn.Conv2d:
    new = conv_like(conv, conv.in_channels, len(index))
    new.weight.copy_(conv.weight[index])
    if conv.bias is not None:
        new.bias.copy_(conv.bias[index])
    return new


@torch.no_grad()
def select_in(conv: nn.Conv2d, index: torch.Tensor) -> nn.Conv2d:
    new = conv_like(conv, len(index), conv.out_channels)
    new.weight.copy_(conv.weight[:, index])
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new


@torch.no_grad()
def select_depthwise(conv: nn.Conv2d, index: torch.Tensor) -> nn.Conv2d:
    new = conv_like(conv, len(index), len(index), groups=len(index))
    new.weight.copy_(conv.weight[index])
    if conv.bias is not None:
        new.bias.copy_(conv.bias[index])
    return new


@torch.no_grad()
def select_bn(bn: nn.BatchNorm2d, index: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(index), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight.copy_(bn.weight[index])
        new.bias.copy_(bn.bias[index])
    if bn.track_running_stats:
        new.running_mean.copy_(bn.running_mean[index])
        new.running_var.copy_(bn.running_var[index])
    return new


@torch.no_grad()
def select_linear_in(linear: nn.Linear, index: torch.Tensor, channels: int) -> nn.Linear:
    """Keep the inputs of ``linear`` that come from channels ``index`` of a flattened map."""
    spatial = linear.in_features // channels
    columns = (index[:, None] * spatial + torch.arange(spatial)[None]).flatten()
    new = nn.Linear(len(columns), linear.out_features, bias=linear.bias is not None)
    new.weight.copy_(linear.weight[:, columns])
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new


@torch.no_grad()
def input_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[int, tuple]:
    """(C, H, W) of the input every Conv2d sees in one forward pass, keyed by ``id(conv)``."""
    shapes: dict[int, tuple] = {}

    def record(module: nn.Module, args: tuple) -> None:  # returning a value would replace args
        shapes.setdefault(id(module), tuple(args[0].shape[1:]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()(torch.zeros((1, *input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return shapes
