"""An out-of-tree autoshrink technique, packaged exactly as a third party would ship one.

``half-precision`` rounds every floating-point weight to the nearest float16 value. The model
still computes in float32 (CPUs lack fast float16 convolutions), but autoshrink's exporter
stores values that are exact in float16 as float16, so the artifact is about half the size.
"""

import dataclasses

import torch
from torch import nn

from autoshrink import Stage, Technique, hookimpl


@dataclasses.dataclass(frozen=True)
class HalfPrecisionOptions:
    keep_batchnorm: bool = True  # batch-norm statistics are few and sensitive


class HalfPrecision(Technique):
    name = "half-precision"
    stage = Stage.QUANTIZATION
    claims = frozenset({"weight-dtype"})
    Options = HalfPrecisionOptions
    paper = "example plugin (float16 weight storage)"

    def search_space(self, trial):
        return HalfPrecisionOptions(
            keep_batchnorm=trial.suggest_categorical("keep_batchnorm", [True, False]))

    def apply(self, model: nn.Module, options, ctx) -> nn.Module:
        with torch.no_grad():
            for module in model.modules():
                if options.keep_batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm):
                    continue
                for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    if tensor.is_floating_point():
                        tensor.copy_(tensor.half().float())
        return model


@hookimpl
def register_techniques(register):
    register(HalfPrecision())
