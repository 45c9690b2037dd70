"""The DiCE unit (DiCENet, Mehta et al.), seed 003 (Sec. II, III-A i), III-B h); Table I no. 15,
Table II no. 13).

DimConv filters the input three ways at once: a depthwise 3x3 convolution along the channels,
one along the width (the width positions act as the groups, the kernel slides over height and
channels) and one along the height. DimFuse then fuses the three results locally (they are
interleaved per channel, a shuffle, and mixed by a grouped 1x1 convolution with one group per
channel) and globally (a depthwise 3x3 convolution for space, weighted per channel by a
sigmoid gate computed from globally pooled features through a grouped 1x1 convolution, the
squeeze-and-excitation part). A pointwise convolution then maps to the output width.

It replaces the 3x3 convolutions of plain stacks (not the stem), of Fire expands and of ResNet
bottlenecks (where the bottleneck's own 1x1 convolution follows and acts as the projection).
The width- and height-wise convolutions depend on the feature-map size, found by a forward pass
at the trial's input size. Starts from scratch, so a trial trains fully.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from autoshrink import Stage, Technique, hookimpl
from autoshrink_plugins.blocks import Fire
from autoshrink_plugins.rewrite import input_shapes, is_plain_conv


class DiCE(nn.Module):
    def __init__(self, channels: int, height: int, width: int, stride: int = 1,
                 gate_group_size: int = 8):
        super().__init__()
        self.channel_wise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.width_wise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.height_wise = nn.Conv2d(height, height, 3, padding=1, groups=height)
        self.local_fuse = nn.Sequential(
            nn.Conv2d(3 * channels, channels, 1, groups=channels, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.spatial_fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
            nn.BatchNorm2d(channels))
        groups = max(1, channels // gate_group_size)
        while channels % groups:
            groups -= 1
        self.channel_gate = nn.Conv2d(channels, channels, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        along_channels = self.channel_wise(x)
        along_width = self.width_wise(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
        along_height = self.height_wise(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        interleaved = torch.stack([along_channels, along_width, along_height], 2)
        fused = self.local_fuse(interleaved.reshape(n, 3 * c, h, w))
        gate = torch.sigmoid(self.channel_gate(fused.mean((2, 3), keepdim=True)))
        return self.spatial_fuse(fused) * gate


def dice_for(conv: nn.Conv2d, shape: tuple, project: bool) -> nn.Module:
    channels, height, width = shape
    unit = DiCE(channels, height, width, conv.stride[0])
    if not project:
        return unit
    return nn.Sequential(unit, nn.Conv2d(channels, conv.out_channels, 1,
                                         bias=conv.bias is not None))


def _three_by_three(module: nn.Module) -> bool:
    return is_plain_conv(module, "spatial") and module.kernel_size == (3, 3) \
        and module.in_channels > 3


class DiceTechnique(Technique):
    name = "dice"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"spatial-convs"})
    inherits_weights = False
    order = 45
    paper = "seed 003, Table I no. 15, Table II no. 13"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if any(_three_by_three(m) for m in model.modules()):
            return True, ""
        return False, "has no ordinary 3x3 convolution after the stem"

    def apply(self, model: nn.Module, options, ctx) -> nn.Module:
        shapes = input_shapes(model, ctx.input_shape)
        for block in list(model.modules()):
            if isinstance(block, Bottleneck) and _three_by_three(block.conv2):
                block.conv2 = dice_for(block.conv2, shapes[id(block.conv2)],
                                       project=block.conv2.in_channels != block.conv2.out_channels)
            elif isinstance(block, Fire) and _three_by_three(block.expand3x3):
                block.expand3x3 = dice_for(block.expand3x3, shapes[id(block.expand3x3)], True)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _three_by_three(child) and id(child) in shapes:
                    setattr(parent, name, dice_for(child, shapes[id(child)], True))
        return model


@hookimpl
def register_techniques(register):
    register(DiceTechnique())
