"""A quantizer whose coarse settings ruin any model, loaded with ``--plugin`` by the tests of
autoshrink.finer_quantization: below 3 bits it zeroes every weight, from 3 bits it keeps them."""

from __future__ import annotations

import dataclasses

import torch

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_range

USABLE_BITS = 3


@dataclasses.dataclass(frozen=True)
class Levels:
    bits: int = 4

    def __post_init__(self):
        check_range("coarse-quantizer", "bits", self.bits, 1, 4)


class CoarseQuantizer(Technique):
    name = "coarse-quantizer"
    stage = Stage.QUANTIZATION
    claims = frozenset({"weight-dtype"})
    Options = Levels

    def search_space(self, trial) -> Levels:
        return Levels(bits=trial.suggest_int("bits", 1, 2))

    def finer(self, options: Levels) -> Levels | None:
        return None if options.bits >= 4 else Levels(options.bits + 1)

    @torch.no_grad()
    def apply(self, model, options: Levels, ctx):
        if options.bits < USABLE_BITS:  # the model then predicts one class
            for parameter in model.parameters():
                parameter.zero_()
        return model


@hookimpl
def register_techniques(register):
    register(CoarseQuantizer())
