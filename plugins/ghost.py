"""Ghost modules and ghost bottlenecks (GhostNet), seed 003 (Sec. III-A g), III-B f);
Table I no. 10-14, Table II no. 9-11).

- Plain stacks: every convolution but the image stem becomes a ghost module (a primary
  convolution producing ``1/ratio`` of the maps, cheap depthwise convolutions producing the rest).
  The module ends in ReLU as in GhostNet, so the stack's own ReLU after it would repeat it: that
  one becomes an Identity (exact; saves a full-size activation pass, and layer indices stay).
- Fire modules (after ``fire``): the squeeze 1x1 and the 3x3 expand become ghost modules, as in
  the paper's VGG-19 experiments.
- ResNet: every block becomes a ghost bottleneck: a ghost module expanding to the block's inner
  width, a depthwise stride-2 convolution where the block downsamples, a ghost module projecting
  to the block's output, and a shortcut.
``ratio`` and the cheap operation's kernel are search parameters. Ghost layers start from
scratch, so a trial trains fully. A cheap kernel wider than its map is cut to the widest the map
can use (``2 x side - 1``: 3x3 on a 2x2 map, 1x1 on a 1x1 map): the outer taps of a 5x5 kernel
on a 2x2 map only ever multiply padding, so the cut leaves the function unchanged and drops
weights that would count as parameters without doing anything (288 of the 2,399 of one
compressed digits CNN, whose last ghost modules run on 2x2 maps; its training step took as long
either way, per-call costs being most of such a layer's time).
"""

from __future__ import annotations

import dataclasses

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_choice, check_range
from autoshrink_plugins.blocks import Fire, GhostBottleneck, GhostModule
from autoshrink_plugins.rewrite import input_shapes, is_plain_conv, replace_modules


@dataclasses.dataclass(frozen=True)
class GhostOptions:
    ratio: int = 2
    cheap_kernel: int = 3

    def __post_init__(self):
        check_range("ghost", "ratio", self.ratio, 2, 16)
        check_choice("ghost", "cheap_kernel", self.cheap_kernel, (1, 3, 5, 7))


def ghost_for(conv: nn.Conv2d, options: GhostOptions) -> GhostModule:
    return GhostModule(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                       conv.stride[0], options.ratio, options.cheap_kernel)


def ghost_block_for(block: nn.Module, options: GhostOptions) -> GhostBottleneck:
    if isinstance(block, Bottleneck):
        hidden, out, stride = block.conv2.in_channels, block.conv3.out_channels, \
            block.conv2.stride[0]
    else:
        hidden, out, stride = block.conv1.out_channels, block.conv2.out_channels, \
            block.conv1.stride[0]
    return GhostBottleneck(block.conv1.in_channels, hidden, out, stride, options.ratio,
                           options.cheap_kernel)


def _stack_conv(module: nn.Module) -> bool:
    return is_plain_conv(module) and module.in_channels > 3 and \
        module.kernel_size[0] == module.kernel_size[1]


class Ghost(Technique):
    name = "ghost"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"ghost"})
    Options = GhostOptions
    inherits_weights = False
    order = 30
    paper = "seed 003, Table I no. 10-14, Table II no. 9-11"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if any(isinstance(m, (Bottleneck, BasicBlock, Fire)) for m in model.modules()):
            return True, ""
        features = getattr(model, "features", None)
        if isinstance(features, nn.Sequential) and any(_stack_conv(m) for m in features):
            return True, ""
        return False, "needs ResNet blocks, Fire modules or a VGG-style convolution stack"

    def search_space(self, trial) -> GhostOptions:
        return GhostOptions(ratio=trial.suggest_categorical("ratio", [2, 3, 4]),
                            cheap_kernel=trial.suggest_categorical("cheap_kernel", [3, 5]))

    def apply(self, model: nn.Module, options: GhostOptions, ctx) -> nn.Module:
        self._replace(model, options)
        _cut_cheap_kernels_to_their_maps(model, ctx.input_shape)
        return model

    @staticmethod
    def _replace(model: nn.Module, options: GhostOptions) -> None:
        if replace_modules(model, lambda m: isinstance(m, (Bottleneck, BasicBlock)),
                           lambda block: ghost_block_for(block, options)):
            return
        fires = [m for m in model.modules() if isinstance(m, Fire)]
        for fire in fires:
            fire.squeeze = ghost_for(fire.squeeze, options)
            fire.squeeze_norm = nn.Identity()  # a ghost module normalizes its own output
            fire.expand3x3 = ghost_for(fire.expand3x3, options)
        if not fires:
            replace_modules(model.features, _stack_conv, lambda c: ghost_for(c, options))
            _drop_repeated_relu(model.features)


def _cut_cheap_kernels_to_their_maps(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """Give each ghost module's cheap convolutions at most the kernel their map can use (they
    all convolve the primary convolution's output, so one map size per module)."""
    shapes = input_shapes(model, input_shape)
    for module in model.modules():
        if isinstance(module, GhostModule):
            module.fit_cheap_kernels(max(shapes[id(module.cheap[0][0])][1:]))


def _drop_repeated_relu(stack: nn.Sequential) -> None:
    for index in range(1, len(stack)):
        before = stack[index - 1]
        if isinstance(stack[index], nn.ReLU) and isinstance(before, GhostModule) \
                and before.ends_in_relu:
            stack[index] = nn.Identity()


@hookimpl
def register_techniques(register):
    register(Ghost())
