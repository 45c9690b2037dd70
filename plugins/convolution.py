"""Depthwise separable convolution, seed 003 (Sobolewski & Szyc, Sec. II-III, Tables I-II no. 4).

Plain stacks (VGG, the small CNN): every k x k convolution becomes a depthwise k x k convolution
followed by a pointwise 1 x 1 one. ResNet bottlenecks and Fire modules: the inner 3 x 3
convolution becomes depthwise only (with out / in filters per channel in a Fire expand), since
the block's own 1 x 1 convolutions already mix channels. This reproduces Table I no. 4 (21.426 M
against 21.425 M) and Table II no. 6, Fire + DW (0.475 M against 0.474 M; a depthwise + pointwise
expand would give 0.607 M).

Choices where the paper is silent, documented here:
- Convolutions reading fewer than ``min_channels`` channels stay as they are; the image stem (1 or
  3 channels) would become rank-1 filters. ``min_channels`` is searchable (4 by default).
- No extra batch-norm/ReLU between the depthwise and pointwise parts (Xception style), so the
  layer count and the parameter count of the paper's tables are kept.
- Weights are inherited: for each input channel the pair (depthwise kernel, pointwise column) is
  the best rank-1 approximation (SVD) of the original kernels reading that channel; a bottleneck's
  depthwise kernel starts from the diagonal of the original kernel.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_range
from autoshrink_plugins.blocks import Fire
from autoshrink_plugins.rewrite import replace_modules


@dataclasses.dataclass(frozen=True)
class DwconvOptions:
    min_channels: int = 4

    def __post_init__(self):
        check_range("dwconv", "min_channels", self.min_channels, 2, 4096)


def _eligible(conv: nn.Module, min_channels: int) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.kernel_size != (1, 1)
            and conv.in_channels >= min_channels)


def separable_from(conv: nn.Conv2d) -> nn.Sequential:
    """Depthwise + pointwise pair initialised as the rank-1 approximation of ``conv``."""
    cin, cout = conv.in_channels, conv.out_channels
    depthwise = nn.Conv2d(cin, cin, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          groups=cin, bias=False, padding_mode=conv.padding_mode)
    pointwise = nn.Conv2d(cin, cout, 1, bias=conv.bias is not None)
    with torch.no_grad():
        kernels = conv.weight.detach().float().permute(1, 0, 2, 3).reshape(cin, cout, -1)
        u, s, vh = torch.linalg.svd(kernels, full_matrices=False)
        root = s[:, :1].sqrt()
        depthwise.weight.copy_((vh[:, :1, :] * root[:, :, None]).reshape(depthwise.weight.shape))
        pointwise.weight.copy_((u[:, :, 0] * root).t().reshape(pointwise.weight.shape))
        if conv.bias is not None:
            pointwise.bias.copy_(conv.bias)
    return nn.Sequential(depthwise, pointwise)


def depthwise_from(conv: nn.Conv2d) -> nn.Conv2d:
    """A depthwise conv with ``out / in`` filters per input channel, starting from the kernels
    of ``conv`` that read the same channel (the 'diagonal' when in == out)."""
    cin, cout = conv.in_channels, conv.out_channels
    depthwise = nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, groups=cin, bias=conv.bias is not None)
    with torch.no_grad():
        source = torch.arange(cout) // (cout // cin)
        depthwise.weight.copy_(conv.weight[torch.arange(cout), source].unsqueeze(1))
        if conv.bias is not None:
            depthwise.bias.copy_(conv.bias)
    return depthwise


def _mixed_elsewhere(conv: nn.Module, min_channels: int) -> bool:
    """A 3x3 whose block already mixes channels with 1x1 convolutions: depthwise alone."""
    return (_eligible(conv, min_channels) and conv.out_channels % conv.in_channels == 0)


MIN_CHANNELS_CHOICES = [4, 32]  # the search's; an RGB stem (3 channels) is never rewritten


class Dwconv(Technique):
    name = "dwconv"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"spatial-convs"})
    Options = DwconvOptions
    order = 40
    paper = "seed 003, Sec. III-A c), Tables I and II no. 4"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        fewest = min(MIN_CHANNELS_CHOICES)
        if any(_eligible(m, fewest) for m in model.modules()):
            return True, ""
        return False, (f"has no ordinary k x k convolution (k > 1) reading {fewest} or more"
                       " channels")

    def search_space(self, trial) -> DwconvOptions:
        return DwconvOptions(min_channels=trial.suggest_categorical("min_channels",
                                                                    MIN_CHANNELS_CHOICES))

    def apply(self, model: nn.Module, options: DwconvOptions, ctx) -> nn.Module:
        low = options.min_channels
        for block in [m for m in model.modules() if isinstance(m, (Bottleneck, Fire))]:
            name = "conv2" if isinstance(block, Bottleneck) else "expand3x3"
            if _mixed_elsewhere(getattr(block, name), low):
                setattr(block, name, depthwise_from(getattr(block, name)))
        replace_modules(model, lambda m: _eligible(m, low), separable_from)
        return model


@hookimpl
def register_techniques(register):
    register(Dwconv())
