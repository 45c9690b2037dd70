"""The redundancy probe (seed 001 stages 1-2): its distortions, its masks, its verdicts, its CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from autoshrink.data import Split, Splits
from autoshrink.errors import BaselineDidNotLearn
from autoshrink.probe import (
    FRACTIONS,
    MASKS,
    REFERENCE_MASK,
    VariantResult,
    check_reference,
    decide,
    mask_input_convolution,
    mask_kernel,
    tile,
)

PARITY_OF_TAP = {0: 1, 1: 0, 2: 1}  # stride 2, padding 1: kernel row i reads rows 2y + i - 1


def _masked_conv(code: str) -> nn.Conv2d:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
    nn.init.uniform_(model[0].weight, 0.5, 1.0)  # no tap is zero by chance
    return mask_input_convolution(model, code)[0]


@pytest.mark.parametrize("code", [REFERENCE_MASK, *(c for cs in MASKS.values() for c in cs)])
def test_masks_hide_exactly_the_pixel_positions_they_name(code):
    """A stride-2 masked convolution ignores exactly the 2x2-cell positions whose taps are all
    zero in the mask; the share of hidden positions is the fraction the paper assigns it."""
    conv = _masked_conv(code)
    x = torch.randn(1, 1, 12, 12)
    kernel = mask_kernel(code)
    hidden = 0
    for row in (0, 1):
        for column in (0, 1):
            perturbed = x.clone()
            perturbed[:, :, row::2, column::2] += 5.0
            changed = not torch.allclose(conv(perturbed), conv(x))
            seen = any(kernel[i, j] for i in range(3) for j in range(3)
                       if PARITY_OF_TAP[i] == row and PARITY_OF_TAP[j] == column)
            assert changed == seen, (code, row, column)
            hidden += not seen
    family = next((f for f, codes in MASKS.items() if code in codes), None)
    assert hidden / 4 == (FRACTIONS[family] if family else 0.0)


def test_masked_taps_stay_zero_through_training():
    conv = _masked_conv("101000101")
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv(torch.randn(2, 1, 8, 8)).square().mean().backward()
    optimizer.step()
    assert conv.stride == (2, 2)
    assert torch.equal(conv.weight[:, :, 1, :], torch.zeros(4, 1, 3))
    assert torch.equal(conv.weight[:, :, :, 1], torch.zeros(4, 1, 3))


def test_tiling_replaces_only_the_named_cell_pixels():
    x = torch.randn(2, 3, 6, 6)
    mean, std = torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1) + 0.5
    splits = Splits(*(Split(x, torch.zeros(2, dtype=torch.long)),) * 3, num_classes=2,
                    normalisation=(mean, std))
    cases = {"MH": {(1, 1)}, "CHB": {(0, 1), (1, 0)}, "GRI": {(0, 1), (1, 0), (1, 1)}}
    for pattern, replaced in cases.items():
        for fill, expected in ((0.0, -mean / std), (1.0, (1 - mean) / std),
                               ("mean", x.mean(dim=(2, 3), keepdim=True))):
            out = tile(x, pattern, fill, splits)
            for row in (0, 1):
                for column in (0, 1):
                    cell = out[:, :, row::2, column::2]
                    if (row, column) in replaced:
                        assert torch.allclose(cell, expected.expand_as(cell))
                    else:
                        assert torch.equal(cell, x[:, :, row::2, column::2])


def _result(stage, name, fraction, error, spread=0.01):
    return VariantResult(stage, name, fraction, {
        "error": [error - spread, error + spread], "loss": [error - spread, error + spread],
        "precision": [1 - error] * 2, "recall": [1 - error] * 2})


def test_verdicts_follow_the_comparisons():
    stage_one = [_result(1, "DN", 0.0, 0.20), _result(1, "MH0", 0.25, 0.205),
                 _result(1, "GRI", 0.75, 0.40)]
    masks = [_result(2, REFERENCE_MASK, 0.0, 0.20), _result(2, "111101111", 0.25, 0.19),
             _result(2, "101010101", 0.5, 0.21), _result(2, "000010000", 0.75, 0.5)]
    result = decide(stage_one + masks)
    assert result.redundancy_found and result.fraction == 0.25
    assert [r["comparable"] for r in result.rows()] == [False, True, False,
                                                        False, True, False, False]
    no_redundancy = decide([_result(1, "DN", 0.0, 0.20), _result(1, "MH0", 0.25, 0.30)]
                           + masks)
    assert not no_redundancy.redundancy_found and no_redundancy.fraction == 0.0


def test_a_reference_variant_that_did_not_learn_is_refused_and_a_weak_one_flagged(caplog):
    """Ten balanced classes on 480 held-out images: 12 % right is guessing, 30 % learned
    something but less than halfway to every answer right, 80 % learned."""
    labels = torch.arange(480) % 10
    with pytest.raises(BaselineDidNotLearn, match="reference variant DN reached 12.0% accuracy"
                                                  " .* after 10 epochs, not clearly better"):
        check_reference("DN", {"error": [0.88, 0.88, 0.88]}, labels, 10)
    check_reference("DN", {"error": [0.7, 0.7, 0.7]}, labels, 10)
    assert "reached 30.0% accuracy on the held-out folds after 10 epochs, less than halfway" \
        in caplog.text
    caplog.clear()
    check_reference("DN", {"error": [0.2, 0.2, 0.2]}, labels, 10)
    assert caplog.text == ""


def test_probe_command_writes_its_table_and_estimate(run_cli, tmp_path):
    # two epochs: one leaves the reference variants at guessing, which the probe refuses
    code, out, err = run_cli("probe", "--folds", "2", "--epochs", "2", "--out", str(tmp_path),
                             "--json", "--quiet")
    assert code == 0, err
    payload = json.loads(out)
    assert [v["variant"] for v in payload["variants"]][:2] == ["DN", "MH"]
    assert len(payload["variants"]) == 10 + 11
    assert payload["fraction"] in (0.0, 0.25, 0.5, 0.75)
    assert all(len(v["error"]) == 2 for v in payload["folds_detail"])
    assert json.loads((tmp_path / "probe.json").read_text())["fraction"] == payload["fraction"]
    if payload["fraction"]:
        assert f"--set drop-layers:redundancy={payload['fraction']:g}" in payload["use_with"]


@pytest.mark.parametrize("argv, message", [
    (["--folds", "1"], "--folds 1 must be at least 2"),
    (["--folds", "100000"], "--folds 100000 is more than the 139 images of this data's rarest"
                            " class outside the test split; use at most 139"),  # a traceback
    (["--gamma", "-1"], "--gamma -1 must be 0 or more"),  # ran a focal loss rewarding mistakes
    (["--model", "tests.user_models:pointwise_first"], "needs a model whose first layer is a"
                                                       " 3x3 convolution"),
])
def test_probe_refuses_bad_input_in_one_line(run_cli, tmp_path, argv, message):
    code, out, err = run_cli("probe", *argv, "--epochs", "1", "--out", str(tmp_path))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1  # nothing said before it
