"""The example plugin's own tests: autoshrink's technique contract, plus what it promises."""

import torch
from autoshrink_example import HalfPrecision, HalfPrecisionOptions

from autoshrink.testing import TechniqueTests


class TestHalfPrecision(TechniqueTests):
    technique = HalfPrecision()
    model = "smallcnn"
    input_shape = (1, 16, 16)


def test_weights_become_exact_in_float16():
    model = TestHalfPrecision().build_model()
    HalfPrecision().apply(model, HalfPrecisionOptions(keep_batchnorm=False), None)
    for parameter in model.parameters():
        assert torch.equal(parameter, parameter.half().float())
