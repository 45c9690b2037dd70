"""Contract checks for techniques, for plugin authors and for autoshrink's own tests.

Subclass :class:`TechniqueTests` in a pytest module and set ``technique``::

    from autoshrink.testing import TechniqueTests
    from my_package import MyTechnique

    class TestMyTechnique(TechniqueTests):
        technique = MyTechnique()
        model = "smallcnn"          # any registered model the technique applies to
        input_shape = (1, 16, 16)

pytest then checks that the technique is declared as the engine expects (name, stage, claims,
Options), that it applies to the model, that its search space yields valid options that survive
a round trip through their strings (and ``finer`` valid ones that end), that ``apply`` leaves a
working classifier (trainable, for architecture rewrites), and that ``rebuild`` re-creates the
structure so that the saved artifact loads and gives the same outputs. Each check is also a
function, so a registry-wide test can run it over every installed technique.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import optuna
import torch
from torch import nn

from autoshrink import artifact
from autoshrink.export import rebuild
from autoshrink.plan import Plan, ScopedTrial, Step, apply_stage
from autoshrink.plugins import PluginHost
from autoshrink.technique import (
    Stage,
    Technique,
    TrialContext,
    declaration_problem,
    options_to_dict,
)


def check_apply(technique: Technique, model: nn.Module,
                input_shape: tuple[int, int, int], num_classes: int = 10) -> nn.Module:
    """``apply`` with default options returns a classifier of the same output shape; an
    architecture rewrite stays trainable (finite gradients for every parameter)."""
    changed = technique.apply(copy.deepcopy(model), technique.Options(),
                              TrialContext(input_shape, num_classes))
    x = torch.randn(4, *input_shape)
    assert changed(x).shape == (4, num_classes), f"{technique.name} changed the output shape"
    if technique.stage is Stage.ARCHITECTURE:
        changed.train()
        changed(x).logsumexp(1).mean().backward()
        grads = [p.grad for p in changed.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), (
            f"{technique.name}: some parameter gets no finite gradient")
    return changed


def check_rebuild(technique: Technique, model: nn.Module, input_shape: tuple[int, int, int],
                  folder: Path, num_classes: int = 10) -> None:
    """The artifact of a model the technique changed loads into the rebuilt structure and
    gives the same outputs."""
    check_plan_rebuild(Plan((Step(technique, technique.Options()),)), model, input_shape,
                       folder, num_classes)


def check_plan_rebuild(plan: Plan, model: nn.Module, input_shape: tuple[int, int, int],
                       folder: Path, num_classes: int = 10) -> nn.Module:
    """:func:`check_rebuild` for a plan of several steps; returns the changed model."""
    ctx = TrialContext(input_shape, num_classes)
    trained, rebuilt = copy.deepcopy(model), copy.deepcopy(model)
    for stage in Stage:
        trained = apply_stage(plan, stage, trained.eval(), ctx)
    path = Path(folder) / "plan.pt"
    artifact.save(trained, path)
    rebuilt = rebuild(rebuilt.eval(), plan, input_shape, num_classes,
                      artifact.load_state_dict(path))
    x = torch.randn(2, *input_shape)
    assert torch.allclose(rebuilt(x), trained(x), atol=1e-5), (
        f"{plan.describe()}: the rebuilt model does not reproduce the saved one")
    return trained


MAX_FINER_STEPS = 64  # a longer chain of ever finer options is taken for one that never ends


def check_search_space(technique: Technique, samples: int = 8) -> None:
    """Sampled options are valid and come back unchanged from their string form; ``finer``
    leads from them through valid, changing options to an end."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(samples):
        trial = study.ask()
        options = technique.search_space(ScopedTrial(trial, technique.name))
        assert isinstance(options, technique.Options)
        as_text = {k: str(v) for k, v in options_to_dict(options).items()}
        assert technique.parse_options(as_text) == options
        check_finer(technique, options)
        study.tell(trial, 0.0)


def check_finer(technique: Technique, options) -> None:
    for _ in range(MAX_FINER_STEPS):
        finer = technique.finer(options)
        if finer is None:
            return
        assert isinstance(finer, technique.Options) and finer != options, (
            f"{technique.name}: finer({options}) gave {finer!r}, not other {technique.Options}")
        options = finer
    raise AssertionError(f"{technique.name}: finer gave ever finer options past"
                         f" {MAX_FINER_STEPS} steps; return None at the finest")


class TechniqueTests:
    """Subclass with ``technique`` set; see the module docstring."""

    technique: ClassVar[Technique]
    model: ClassVar[str] = "smallcnn"
    input_shape: ClassVar[tuple[int, int, int]] = (1, 16, 16)
    num_classes: ClassVar[int] = 10

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        channels, size, _ = self.input_shape
        return PluginHost.discover().model(self.model).build(self.num_classes, channels,
                                                              size).eval()

    def test_is_declared_as_the_engine_expects(self):
        problem = declaration_problem(self.technique)
        assert problem is None, f"{type(self.technique).__name__}: {problem}"

    def test_applies_to_the_model(self):
        ok, reason = self.technique.applies_to(self.build_model())
        assert ok, f"{self.technique.name} does not apply to {self.model}: {reason}"

    def test_search_space_gives_valid_options(self):
        check_search_space(self.technique)

    def test_apply_leaves_a_working_classifier(self):
        check_apply(self.technique, self.build_model(), self.input_shape, self.num_classes)

    def test_rebuild_loads_the_saved_model(self, tmp_path):
        check_rebuild(self.technique, self.build_model(), self.input_shape, tmp_path,
                      self.num_classes)
