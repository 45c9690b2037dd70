"""Starting plans: a plan as a report prints it is measured first, exactly as written."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch

from autoshrink.config import build_config
from autoshrink.errors import UsageError
from autoshrink.plan import fixed_option_values, sample_plan
from autoshrink.start_plans import start_trials
from autoshrink.technique import TrialContext
from tests.conftest import FAST
from tests.test_plan import random_plans

# VGG-11's plans use the same techniques as the small CNN's, at four times the suite's time
FAMILIES = [("smallcnn", (1, 16, 16)), ("resnet18", (3, 16, 16))]


def replayed(host, text: str, base, shape, fixed=None) -> str:
    """The plan a fresh study samples from ``text`` queued as a starting plan."""
    held = fixed_option_values(host.techniques, fixed or {})
    [start] = start_trials((text,), host.techniques, host.techniques, held, (1.0,))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    study.enqueue_trial(start.params)
    plan, _ = sample_plan(study.ask(), host.techniques, copy.deepcopy(base),
                          TrialContext(shape, 10), held)
    return plan.describe()


@pytest.mark.parametrize("model_name, shape", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_a_sampled_plans_text_starts_the_same_plan_again(host, model_name, shape):
    torch.manual_seed(0)
    base = host.model(model_name).build(10, shape[0], shape[1]).eval()
    texts = {plan.describe() for plan, _, _ in random_plans(host, base, shape, 10, seed=2)}
    assert len(texts) > 5
    for text in sorted(texts):
        assert replayed(host, text, base, shape) == text


def test_unnamed_options_take_their_defaults_or_held_values(host):
    base = host.model("smallcnn").build(10, 1, 16).eval()
    shape = (1, 16, 16)
    assert replayed(host, "quantize-int8", base, shape) == "quantize-int8"  # not sampled ones
    held = {"prune-l1": {"steps": "5", "lr": "0.004"}}  # lr: held, though never searched
    assert replayed(host, "prune-l1(amount=0.5)", base, shape, held) == \
        "prune-l1(amount=0.5, steps=5, lr=0.004)"


def test_the_training_length_is_the_longest_offered_unless_the_plan_names_one(host):
    lengths = (0.25, 0.5, 1.0)
    full, half, untrained = start_trials(
        ("gap-classifier + prune-l1(amount=0.5)", "gap-classifier @ 50% epochs",
         "quantize-int8"), host.techniques, host.techniques, {}, lengths)
    assert full.params["training.length"] == 1.0 and full.text == \
        "gap-classifier + prune-l1(amount=0.5)"
    assert half.params["training.length"] == 0.5 and half.text == "gap-classifier @ 50% epochs"
    assert "training.length" not in untrained.params  # nothing trains, nothing is sampled
    assert untrained.params["use.quantize-int8"] and not untrained.params["use.ghost"]


@pytest.mark.parametrize("text, searched, fixed, message", [
    ("magic", None, {}, "unknown technique 'magic'"),
    ("prune-l1(amount 0.5)", None, {}, "prune-l1's option 'amount 0.5' is not OPTION=VALUE"),
    ("prune-l1(amount=lots)", None, {}, "option amount='lots' of technique 'prune-l1'"),
    ("prune-l1(speed=2)", None, {}, "has no option 'speed'"),
    ("prune-l1 + + quantize-int8", None, {}, "has an empty step"),
    ("prune-l1[amount=0.5]", None, {}, "'prune-l1[amount=0.5]' is not TECHNIQUE"),
    ("prune-l1(amount=0.9)", None, {}, "prune-l1.amount=0.9 is outside what the search samples"
                                       " (0.1 to 0.5 in steps of 0.05)"),
    ("prune-l1(amount=0.33)", None, {}, "prune-l1.amount=0.33 is outside"),
    ("fire(squeeze_ratio=5)", None, {}, "search samples (4, 8, 16)"),
    ("prune-l1(lr=0.1)", None, {}, "hold it for the whole search with --set prune-l1:lr=0.1"),
    ("prune-l1(steps=4)", None, {"prune-l1": {"steps": "2"}}, "the search holds it at 2"),
    ("prune-l1(lr=0.1)", None, {"prune-l1": {"lr": "0.01"}}, "the search holds it at 0.01"),
    ("gap-classifier + no-fc", None, {}, "both rewrite the model's classifier"),
    ("ghost + prune-l1", ("prune-l1",), {}, "ghost is not searched (--techniques/--exclude)"),
    ("ghost @ 30% epochs", None, {}, "30% epochs is not a training length this search offers"),
    ("quantize-int8 @ 50% epochs", None, {}, "trains nothing"),
])
def test_a_plan_the_search_would_not_sample_is_refused_naming_why(host, text, searched, fixed,
                                                                  message):
    searched = {n: host.techniques[n] for n in searched} if searched else host.techniques
    held = fixed_option_values(host.techniques, fixed)
    with pytest.raises(UsageError, match=None) as raised:
        start_trials((text,), host.techniques, searched, held, (0.25, 0.5, 1.0))
    assert message in str(raised.value) and repr(text) in str(raised.value)


def test_a_search_measures_its_starting_plans_first_and_once(tmp_path, run_cli):
    out = tmp_path / "run"
    plans = ["gap-classifier + prune-l1(amount=0.3, steps=1)", "quantize-int8"]
    args = ["search", "--out", str(out), "--n-jobs", "1", *FAST, "--training-lengths", "0.5,1",
            "--techniques", "gap-classifier,prune-l1,quantize-int8",
            *(flag for plan in plans for flag in ("--start-plan", plan))]
    code, _, first = run_cli(*args, "--n-trials", "2")
    assert code == 0, first
    code, _, err = run_cli(*args, "--n-trials", "3")
    assert code == 0, err
    trials = optuna.load_study(study_name="digits-smallcnn",
                               storage=f"sqlite:///{out}/study.db").trials
    assert len(trials) == 3  # the resumed search did not queue them again
    assert [t.user_attrs.get("start_plan") for t in trials] == [*plans, None]
    assert [t.user_attrs["plan_text"] for t in trials[:2]] == plans
    assert trials[0].params["training.length"] == 1.0  # the longest offered
    assert "starting plan" not in first + err  # both ran as written


def test_a_preset_lists_starting_plans_and_the_command_line_replaces_them(tmp_path):
    preset = tmp_path / "start.toml"
    preset.write_text('[search]\nstart_plans = ["prune-l1(amount=0.5, steps=2)", "ghost"]\n')
    assert build_config(str(preset), {}).start_plans == ("prune-l1(amount=0.5, steps=2)",
                                                          "ghost")
    given = build_config(str(preset), {"start_plans": ["fire(squeeze_ratio=8)"]})
    assert given.start_plans == ("fire(squeeze_ratio=8)",)  # commas inside a plan stay in it
    assert given.confirmation(4).start_plans == ()  # a proxy's confirmation starts none


def test_a_starting_plan_that_runs_otherwise_is_warned_of(tmp_path, run_cli):
    code, _, err = run_cli("search", "--out", str(tmp_path / "run"), "--n-trials", "1", *FAST,
                           "--start-plan", "grouped-pointwise + quantize-int8")
    assert code == 0, err
    assert ("starting plan 'grouped-pointwise + quantize-int8 @ 50% epochs' runs as"
            " 'quantize-int8': the techniques left out do not apply to smallcnn") in err
