"""Building blocks shared by the architecture techniques of seed 003 (Sobolewski & Szyc).

Each block is an ordinary ``nn.Module`` with named parts, so that later rewrites in the same
plan can recognise and change them (e.g. ``dwconv`` makes a Fire module's 3x3 expand depthwise,
``grouped-pointwise`` groups its 1x1 convolutions, ``se`` attaches after it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: interleave the channels of ``groups`` groups."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's own op keeps channels_last; a view-transpose-reshape returns NCHW, after
        # which a max-pool ran 16x slower and the next convolution converted back
        return F.channel_shuffle(x, self.groups)

    def permutation(self, channels: int) -> torch.Tensor:
        """Output position j holds input channel permutation[j]."""
        return torch.arange(channels).view(self.groups, -1).t().reshape(-1)


class Fire(nn.Module):
    """SqueezeNet's Fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated.

    ``shuffle`` (set by grouped-pointwise) interleaves the concatenated expand channels.
    ``normalize_squeeze`` puts a batch norm between the squeeze and its ReLU, for networks
    that have no batch norm of their own (see ``autoshrink_plugins.fire``).
    """

    def __init__(self, in_channels: int, squeeze: int, expand1x1: int, expand3x3: int,
                 stride: int = 1, normalize_squeeze: bool = False):
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze, 1)
        self.squeeze_norm = nn.BatchNorm2d(squeeze) if normalize_squeeze else nn.Identity()
        self.squeeze_act = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1, stride=stride)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, stride=stride, padding=1)
        self.shuffle: nn.Module = nn.Identity()
        self.out_channels = expand1x1 + expand3x3  # later rewrites keep the output width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze_act(self.squeeze_norm(self.squeeze(x)))
        return self.shuffle(torch.cat([self.expand1x1(s), self.expand3x3(s)], 1))


class FireResidual(nn.Module):
    """A ResNet bottleneck rebuilt around a Fire module, skip connection kept (Table I no. 2)."""

    def __init__(self, fire: Fire, downsample: nn.Module | None):
        super().__init__()
        self.fire = fire
        self.bn = nn.BatchNorm2d(fire.out_channels)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn(self.fire(x)) + identity)


def _cheap_conv(channels: int, kernel: int) -> nn.Conv2d:
    """A ghost module's cheap operation: depthwise, stride 1, the map's size kept."""
    return nn.Conv2d(channels, channels, kernel, 1, kernel // 2, groups=channels, bias=False)


class GhostModule(nn.Module):
    """GhostNet's module: a few 'intrinsic' maps from a primary conv, the rest from cheap
    depthwise convolutions of them, concatenated and cut to ``out_channels``.

    The ``ratio - 1`` cheap maps of each intrinsic map come from ``ratio - 1`` separate
    depthwise convolutions rather than one with a channel multiplier: the same operation and
    parameter count, but oneDNN has a fast kernel only for plain depthwise convolutions (the
    multiplier form ran 1.5-3x slower here, fastest of all at ratio 2 where both coincide).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, ratio: int = 2, cheap_kernel: int = 3, relu: bool = True):
        super().__init__()
        self.ends_in_relu = relu
        intrinsic = -(-out_channels // ratio)
        self.surplus = intrinsic * ratio - out_channels  # maps cut off the end
        self.primary = nn.Sequential(
            nn.Conv2d(in_channels, intrinsic, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(intrinsic), nn.ReLU(inplace=True) if relu else nn.Identity())
        self.cheap = nn.ModuleList(
            nn.Sequential(_cheap_conv(intrinsic, cheap_kernel), nn.BatchNorm2d(intrinsic),
                          nn.ReLU(inplace=True) if relu else nn.Identity())
            for _ in range(ratio - 1))

    def fit_cheap_kernels(self, side: int) -> None:
        """Cut cheap kernels wider than a ``side`` x ``side`` map can use (``2 x side - 1``):
        their outer taps only ever meet padding, so the function stays and dead weights go."""
        reach = 2 * side - 1
        for cheap in self.cheap:
            if cheap[0].kernel_size[0] > reach:
                cheap[0] = _cheap_conv(cheap[0].in_channels, reach)

    @property
    def out_channels(self) -> int:
        """Read from the layers (the primary batch norm's width: dwconv may have split the
        primary convolution), so it stays right after prune-filters removes channels."""
        return self.primary[1].num_features * (len(self.cheap) + 1) - self.surplus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary(x)
        maps = torch.cat([primary, *(cheap(primary) for cheap in self.cheap)], 1)
        # no slice when nothing is cut: Torch-Pruning can then follow the channels
        return maps[:, :self.out_channels] if self.surplus else maps


class GhostBottleneck(nn.Module):
    """GhostNet's bottleneck: ghost module expands, [depthwise stride-2], ghost module projects,
    plus a shortcut (identity, or depthwise + pointwise when the shape changes)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, stride: int,
                 ratio: int = 2, cheap_kernel: int = 3):
        super().__init__()
        self.expand = GhostModule(in_channels, hidden, ratio=ratio, cheap_kernel=cheap_kernel)
        self.downsample_dw: nn.Module = nn.Identity()
        if stride > 1:
            self.downsample_dw = nn.Sequential(
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden))
        self.attention: nn.Module = nn.Identity()  # se attaches here, before the projection
        self.project = GhostModule(hidden, out_channels, ratio=ratio, cheap_kernel=cheap_kernel,
                                   relu=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride > 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.attention(self.downsample_dw(self.expand(x))))
        return y + self.shortcut(x)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: GAP, two linear layers with ReLU, sigmoid channel weights.

    Starts close to the identity (weights near 1) so a trained network is not disturbed.
    """

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * weights[:, :, None, None]
