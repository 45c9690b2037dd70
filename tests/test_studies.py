"""Every preset in studies/ parses and runs one tiny trial with its own techniques.

GPU-scale presets (``-gpu``) run here on the CPU on the embedded digits at their input size
instead of their own data (CIFAR would be downloaded; VGG-19 on Fashion-MNIST takes minutes
even for one tiny trial): the model, the techniques and their held options are what the tiny
trial checks."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autoshrink.config import STUDIES_DIR, build_config
from autoshrink.search import Search, open_study
from autoshrink.task import load_task

PRESETS = sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))
FASHION = Path("/usr/share/datasets/fashion-mnist")
# the shortest runs of the techniques that train for a while on their own
TINY = {"adapnet": {"max_periods": 1, "lsep": 2}, "pyramid": {"block_epochs": 1},
        "prune-l1": {"steps": 1},  # each step fine-tunes and validates VGG-19 or ResNet-101
        "quantize-int8": {"observer": "minmax"}}  # histogram: a minute on ResNet-101
OFFLINE = {"digits", "fashion-mnist"}  # datasets the tests may read (never download)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.usefixtures("untrained_baselines")
def test_preset_runs_one_tiny_trial(host, tmp_path, preset):
    full = build_config(preset, {})
    if full.dataset == "fashion-mnist" and not FASHION.is_dir():
        pytest.skip("needs the Debian package dataset-fashion-mnist")
    tiny = {name: values for name, values in TINY.items() if name in full.techniques}
    stand_in = {} if full.dataset in OFFLINE and not preset.endswith("-gpu") else {
        "dataset": "digits", "input_size": full.input_size}  # None: the model's smallest
    config = build_config(preset, {"n_trials": 1, "epochs": 1, "finetune_epochs": 1,
                                   "proxy_data": 0.05, "early_abort": False,
                                   "out": str(tmp_path), "fixed_options": tiny, **stand_in})
    for name, values in full.fixed_options.items():  # the preset's own, unless made tiny
        assert {**values, **tiny.get(name, {})} == config.fixed_options[name]
    wanted = set(full.techniques)  # each technique of the preset, in one plan where they fit
    if wanted:
        study, _ = open_study(config, load_task(config, host))
        study.enqueue_trial({f"use.{name}": name in wanted for name in host.techniques},
                            skip_if_exists=False)
    trial = Search(config, host).run().trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("error")
    assert not wanted or trial.user_attrs["plan_text"] != "baseline"
    for name, values in config.fixed_options.items():
        for key, value in values.items():
            if f"{name}.{key}" in trial.params:
                assert trial.params[f"{name}.{key}"] == value


@pytest.mark.parametrize("preset", [p for p in PRESETS
                                    if p.startswith("seed") and not p.endswith("-gpu")])
def test_the_papers_cpu_presets_train_every_trial_for_the_whole_recipe(preset):
    """Their few trials are compared with the papers' tables: at the search's default
    fidelities a third of them fine-tuned for a quarter of the recipe (VGG-19 rewrites of the
    ablation read chance accuracy after one epoch)."""
    assert build_config(preset, {}).training_lengths == (1.0,)
