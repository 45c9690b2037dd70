"""Plan sampling: whatever the sampler picks (every stage) builds, runs, respects the claims."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch

from autoshrink.plan import apply_stage, sample_plan
from autoshrink.technique import Stage, TrialContext

# ResNet-50's bottlenecks are covered by the registry tests (tests/test_techniques.py); here
# they would cost a minute of the suite for the same code paths as ResNet-18's blocks.
FAMILIES = [("smallcnn", (1, 16, 16)), ("vgg11", (3, 32, 32)), ("resnet18", (3, 16, 16))]


def random_plans(host, base: torch.nn.Module, shape, count: int, seed: int):
    """``count`` plans a random sampler picks for ``base``, each with its rewritten model and
    the context it was sampled with."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(count):
        trial = study.ask()
        ctx = TrialContext(shape, 10)
        plan, model = sample_plan(trial, host.techniques, copy.deepcopy(base), ctx)
        yield plan, model, ctx
        study.tell(trial, 0.0)


@pytest.mark.parametrize("model_name, shape", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_random_plans_always_build_and_run(host, model_name, shape):
    torch.manual_seed(0)
    base = host.model(model_name).build(10, shape[0], shape[1]).eval()
    seen = set()
    for plan, model, ctx in random_plans(host, base, shape, 12, seed=1):
        for stage in (Stage.TRAINING, Stage.POST_TRAINING, Stage.QUANTIZATION):
            model = apply_stage(plan, stage, model.eval(), ctx)
        claims = [c for step in plan.steps for c in step.technique.claims]
        assert len(claims) == len(set(claims)), plan.describe()
        assert model.eval()(torch.randn(2, *shape)).shape == (2, 10), plan.describe()
        seen.add(plan.describe())
    assert len(seen) > 6  # the sampler really explored different combinations


def test_fixed_options_are_held_and_recorded(host):
    from autoshrink.plan import fixed_option_values

    fixed = fixed_option_values(host.techniques, {"prune-l1": {"amount": "0.35", "steps": 2,
                                                               "lr": 0.004}})
    assert fixed == {"prune-l1": {"amount": 0.35, "steps": 2, "lr": 0.004}}
    base = host.model("smallcnn").build(10, 1, 16).eval()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(6):
        study.enqueue_trial({"use.prune-l1": True})
        trial = study.ask()
        plan, _ = sample_plan(trial, {"prune-l1": host.technique("prune-l1")}, base,
                              TrialContext((1, 16, 16), 10), fixed)
        options = plan.steps[0].options
        assert (options.amount, options.steps, options.lr) == (0.35, 2, 0.004)  # lr: unsearched
        assert trial.params["prune-l1.amount"] == 0.35
        study.tell(trial, 0.0)


@pytest.mark.parametrize("fixed, message", [
    ({"magic": {"x": 1}}, "unknown technique 'magic'"),
    ({"prune-l1": {"speed": 1}}, "has no option 'speed'"),
    ({"prune-l1": {"amount": "lots"}}, "amount='lots' of technique 'prune-l1' must be a number"),
    ({"prune-l1": {"steps": "2.5"}}, "steps='2.5' of technique 'prune-l1' must be a whole number"),
    ({"prune-filters": {"global_ranking": "maybe"}}, "must be true or false"),  # "a bool"
])
def test_bad_fixed_options_are_refused(host, fixed, message):
    from autoshrink.errors import UsageError
    from autoshrink.plan import fixed_option_values

    with pytest.raises(UsageError, match=message):
        fixed_option_values(host.techniques, fixed)


def test_resuming_with_other_held_options_is_refused(host, tmp_path):
    from autoshrink.config import build_config
    from autoshrink.errors import UsageError
    from autoshrink.search import open_study
    from autoshrink.task import load_task

    held = {"prune-l1": {"amount": "0.3"}}
    config = build_config(None, {"out": str(tmp_path), "fixed_options": held})
    task = load_task(config, host)
    open_study(config, task)
    open_study(build_config(None, {"out": str(tmp_path),  # same values, typed: accepted
                                   "fixed_options": {"prune-l1": {"amount": 0.3}}}), task)
    with pytest.raises(UsageError, match="created with --set prune-l1:amount=0.3"):
        open_study(build_config(None, {"out": str(tmp_path)}), task)


def test_a_rewrite_that_changes_nothing_is_left_out_of_the_plan(host):
    """The plan names only what was done: a rewrite that finds nothing to change at the
    sampled options (here one that never changes anything) is dropped, and does not hold its
    claim against another technique."""
    import dataclasses

    from torch import nn

    from autoshrink.technique import Technique

    @dataclasses.dataclass(frozen=True)
    class NoOptions:
        pass

    class Idle(Technique):
        name, stage, Options, order = "idle", Stage.ARCHITECTURE, NoOptions, 0
        claims = frozenset({"spatial-convs"})

        def search_space(self, trial):
            return NoOptions()

        def apply(self, model, options, ctx):
            return model

    techniques = {"idle": Idle(), "dwconv": host.techniques["dwconv"]}
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 10))
    trial = optuna.trial.FixedTrial({"use.idle": True, "use.dwconv": True,
                                     "dwconv.min_channels": 4})
    plan, rewritten = sample_plan(trial, techniques, model, TrialContext((8, 8, 8), 10))
    assert [step.name for step in plan.steps] == ["dwconv"]
    assert isinstance(rewritten[0], nn.Sequential)  # dwconv's depthwise-separable pair


def test_every_technique_receives_the_model_on_the_cpu():
    """Rewrites build their layers on the CPU, while the trainer leaves a model on its GPU: a
    model left there (the trained baseline, a technique that fine-tuned it) is moved back
    before each technique, during sampling and in every later stage."""
    import dataclasses

    from torch import nn

    from autoshrink.plan import Plan, Step
    from autoshrink.technique import Technique

    class Placed(nn.Sequential):
        """Says where it was last sent: ``on_gpu`` stands for a trainer's ``.to("cuda")``."""
        on_gpu = True  # a baseline the trainer trained and left on its GPU

        def cpu(self):
            self.on_gpu = False
            return super().cpu()

    @dataclasses.dataclass(frozen=True)
    class NoOptions:
        pass

    received = []

    def technique(name: str, stage: Stage) -> Technique:
        class FineTunesOnGpu(Technique):
            Options, claims, order = NoOptions, frozenset(), 0

            def search_space(self, trial):
                return NoOptions()

            def apply(self, model, options, ctx):
                received.append((self.name, model.on_gpu))
                model.append(nn.Identity())  # a rewrite: the structure changes
                model.on_gpu = True  # as after ctx.finetune on a GPU
                return model

        FineTunesOnGpu.name, FineTunesOnGpu.stage = name, stage
        return FineTunesOnGpu()

    rewrites = {name: technique(name, Stage.ARCHITECTURE) for name in ("first", "second")}
    model = Placed(nn.Flatten(), nn.Linear(16, 10))
    trial = optuna.trial.FixedTrial({"use.first": True, "use.second": True})
    ctx = TrialContext((1, 4, 4), 10)
    plan, model = sample_plan(trial, rewrites, model, ctx)
    later = Plan((Step(technique("pruner", Stage.POST_TRAINING), NoOptions()),))
    apply_stage(later, Stage.POST_TRAINING, model, ctx)
    assert received == [("first", False), ("second", False), ("pruner", False)]
