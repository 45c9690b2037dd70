"""SqueezeNet Fire modules, seed 003 (Sec. III-A a), Table I no. 2; III-B c), Table II no. 5).

Plain stacks (VGG, small CNN): every convolution but the image stem becomes a Fire module that
keeps the layer's output width; the squeeze has ``out / squeeze_ratio`` channels (8 in the
paper's VGG-19) and the 1x1 and 3x3 expands give half the output each. VGG-19 + GAP + Fire:
1.8005 M parameters (paper 1.801 M).
ResNet: each bottleneck becomes a Fire module with the skip connection kept; the squeeze maps
to the bottleneck width (ratio 4 of the block output) and the expands restore the block output.
The modules start from scratch (nothing to inherit), so a trial trains for its share of
``--epochs`` rather than fine-tuning.

Where we deviate: in a network without batch norm (seed 000's CNN) each squeeze gets one
between the convolution and its ReLU. Retrained from the trained digits baseline without it,
2 to 5 of 6 runs of four Fire plans stayed at chance accuracy (a squeeze of a few channels
behind ReLU dies, and nothing rescales the deeper stack); with it none of 24 did, within 0-3 pp
of the baseline. The paper's VGG-19 and ResNet put a batch norm after every Fire module
already, so they get none and keep the paper's parameter counts.
"""

from __future__ import annotations

import dataclasses

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_range
from autoshrink_plugins.blocks import Fire, FireResidual
from autoshrink_plugins.rewrite import is_plain_conv, replace_modules


@dataclasses.dataclass(frozen=True)
class FireOptions:
    squeeze_ratio: int = 8

    def __post_init__(self):
        check_range("fire", "squeeze_ratio", self.squeeze_ratio, 2, 64)


def fire_for(conv: nn.Conv2d, ratio: int, normalize_squeeze: bool) -> Fire:
    out = conv.out_channels
    return Fire(conv.in_channels, max(1, out // ratio), out // 2, out - out // 2,
                stride=conv.stride[0], normalize_squeeze=normalize_squeeze)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fire_block_for(block: nn.Module, ratio: int) -> FireResidual:
    first = block.conv1
    out = block.conv3.out_channels if isinstance(block, Bottleneck) else block.conv2.out_channels
    stride = block.conv2.stride[0] if isinstance(block, Bottleneck) else block.conv1.stride[0]
    fire = Fire(first.in_channels, max(1, out // ratio), out // 2, out - out // 2, stride=stride)
    return FireResidual(fire, block.downsample)


def _stack_conv(module: nn.Module) -> bool:
    return is_plain_conv(module, "spatial") and module.in_channels > 3


class FireTechnique(Technique):
    name = "fire"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"blocks"})
    Options = FireOptions
    inherits_weights = False
    order = 20
    paper = "seed 003, Table I no. 2, Table II no. 5"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if any(isinstance(m, (Bottleneck, BasicBlock)) for m in model.modules()):
            return True, ""
        if isinstance(getattr(model, "features", None), nn.Sequential) and any(
                _stack_conv(m) for m in model.features):
            return True, ""
        return False, "needs ResNet blocks or a VGG-style features stack of convolutions"

    def search_space(self, trial) -> FireOptions:
        return FireOptions(squeeze_ratio=trial.suggest_categorical("squeeze_ratio", [4, 8, 16]))

    def apply(self, model: nn.Module, options: FireOptions, ctx) -> nn.Module:
        ratio = options.squeeze_ratio
        if replace_modules(model, lambda m: isinstance(m, (Bottleneck, BasicBlock)),
                           lambda block: fire_block_for(block, ratio)):
            return model
        normalize = not has_batch_norm(model)
        replace_modules(model.features, _stack_conv,
                        lambda conv: fire_for(conv, ratio, normalize))
        return model


@hookimpl
def register_techniques(register):
    register(FireTechnique())
