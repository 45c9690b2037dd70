"""Baseline builds and single-change columns reproduce seed 003's Tables I and II (within 3 %)."""

from __future__ import annotations

import pytest

PAPER = [
    # model, classes, applied techniques, params [M], MACs ("FLOPS") [M]
    ("vgg19", 10, [], 38.959, 417.65),                             # Table II no. 1
    ("vgg19", 10, ["gap-classifier"], 20.040, 398.74),             # Table II no. 2
    ("vgg19", 10, ["gap-classifier", "dwconv"], 2.285, 46.76),     # Table II no. 4
    ("resnet101", 100, [], 42.697, 2520.41),                       # Table I no. 1
    ("resnet101", 100, ["dwconv"], 21.425, 1279.72),               # Table I no. 4
]


@pytest.mark.parametrize("model, classes, applied, params_m, macs_m", PAPER)
def test_inspect_reproduces_paper_counts(run_json, model, classes, applied, params_m, macs_m):
    argv = ["inspect", "--model", model, "--num-classes", str(classes), "--input-shape", "3x32x32"]
    for name in applied:
        argv += ["--apply", name]
    result = run_json(*argv)
    assert result["params"] / 1e6 == pytest.approx(params_m, rel=0.03)
    assert result["macs"] / 1e6 == pytest.approx(macs_m, rel=0.07)
    # float32 weights: the artifact holds ~4 bytes per parameter, never less
    assert result["size_bytes"] >= 4 * result["nonzero_params"] * 0.95


def test_baseline_counts_are_exact(run_json):
    assert run_json("inspect", "--model", "vgg19", "--num-classes", "10",
                    "--input-shape", "3x32x32")["params"] == 38_958_922
    assert run_json("inspect", "--model", "resnet101", "--num-classes", "100",
                    "--input-shape", "3x32x32")["params"] == 42_697_380


def test_inspect_says_why_a_technique_does_not_apply(run_json):
    result = run_json("inspect", "--model", "resnet18", "--num-classes", "10",
                      "--input-shape", "3x32x32")
    gap = result["techniques"]["gap-classifier"]
    assert gap["applies"] is False and "classifier" in gap["reason"]
    assert result["techniques"]["dwconv"]["applies"] is True


def test_user_model_by_reference(run_json):
    result = run_json("inspect", "--model", "torchvision.models:mobilenet_v3_small",
                      "--num-classes", "10", "--input-shape", "3x32x32")
    assert 1e6 < result["params"] < 2e6
