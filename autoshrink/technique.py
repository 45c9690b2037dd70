"""The contract every compression technique fulfils.

A technique names itself, says at which stage of a trial it acts, which parts of a model it
rewrites (``claims``: two techniques with a common claim are never sampled together), whether it
applies to a given model, its own search space, and how it changes a model.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from autoshrink.errors import OptionError


class Stage(enum.IntEnum):
    """Trial stages, in the order a plan runs them."""

    ARCHITECTURE = 0
    TRAINING = 1
    POST_TRAINING = 2
    QUANTIZATION = 3

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a technique that has none."""


class TrainerCallback:
    """What a training-stage technique plugs into the trainer; every method is optional.

    ``max_grad_norm``: a loss sharper than cross-entropy can ask the trainer to clip the
    gradients' total norm to this value (the smallest asked for wins; None: no clipping).
    """

    max_grad_norm: float | None = None

    def loss(self, loss: torch.Tensor, logits: torch.Tensor, inputs: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
        """Return the loss to minimise instead of the plain cross-entropy ``loss``."""
        return loss

    def on_batch(self, indices: torch.Tensor) -> None:
        """Called by the trainer before each step's ``loss`` with the positions of the batch's
        samples in the training split, the rows of :meth:`TrialContext.training_outputs`.
        A technique's own training loop may not call it, so ``loss`` must work without."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called after each epoch with the model being trained."""


@dataclasses.dataclass
class TrialContext:
    """What a technique may use while it acts: data, training and the device.

    ``finetune`` and ``calibration_batches`` work without data too (``inspect``): then
    fine-tuning does nothing and calibration uses random inputs of the right shape.
    ``teacher`` is the trained baseline (eval mode, shared: never change it) and
    ``target_accuracy`` the validation accuracy that meets the budget; both are None without a
    search. ``accuracy_fn`` measures validation accuracy. When a saved model is being rebuilt,
    ``saved_state`` holds its state dict, for techniques whose structure depends on training.
    ``training_outputs_fn`` gives a fixed model's outputs on the whole training split (see
    :meth:`training_outputs`).
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    finetune_fn: Callable[..., nn.Module] | None = None
    calibration_fn: Callable[[int], Iterator[torch.Tensor]] | None = None
    accuracy_fn: Callable[[nn.Module], float] | None = None
    batches_fn: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None
    batches_per_epoch: int = 0
    callbacks: list[TrainerCallback] = dataclasses.field(default_factory=list)
    teacher: nn.Module | None = None
    target_accuracy: float | None = None
    saved_state: Mapping[str, Any] | None = None
    training_outputs_fn: Callable[[nn.Module], torch.Tensor] | None = None
    seed: int = 0
    # technique name -> the options it ended with, where it stopped short of those it was given
    settled_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the validation accuracy of the model the last ``finetune`` returned, where it measured it
    # on the whole split (with ``patience``, on a split of at most ``VALIDATION_PART`` samples:
    # its best epoch's), so that a technique need not measure it again
    finetuned_accuracy: float | None = None

    def finetune(self, model: nn.Module, *, max_epochs: int | None = None,
                 lr: float | None = None, patience: int | None = 1, constant_lr: bool = False,
                 watched: bool = True, label: str = "fine-tuning") -> nn.Module:
        """Train ``model`` on the training split; with ``patience``, keep its best epoch on
        validation (see :meth:`Trainer.fit` for when it stops early). ``max_epochs`` and
        ``lr`` default to the recipe's fine-tuning length and rate (``--finetune-epochs``);
        ``max_epochs=RECIPE_EPOCHS`` also means the recipe's length. A trial's training length
        (``--training-lengths``) shortens only its main training, never these runs.

        ``watched=False`` exempts the run from the engine's early abort, for intermediate
        networks (a pyramid's first block) that are not meant to meet the budget themselves.
        ``label`` names the run in the trial's log after the technique ("prune-l1's
        fine-tuning after step 2 of 5"), so that a long trial's lines tell its runs apart.
        With ``patience`` it sets ``finetuned_accuracy`` to the validation accuracy of the
        epoch it kept, which the returned model has, where it compared epochs on the whole split
        (one of at most ``autoshrink.train.VALIDATION_PART`` samples); None means measure it.
        """
        self.finetuned_accuracy = None
        if self.finetune_fn is None:
            return model
        return self.finetune_fn(model, max_epochs=max_epochs, lr=lr, patience=patience,
                                constant_lr=constant_lr, watched=watched, label=label)

    def training_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled (inputs, labels) batches of the training split on the training
        device, for techniques that run their own training loop (none without data)."""
        if self.batches_fn is not None:
            yield from self.batches_fn()

    def training_outputs(self, model: nn.Module) -> torch.Tensor | None:
        """The outputs of ``model``, which must not change any more (the teacher), for every
        training sample in the split's order (None without data). Computed once per model and
        shared by the trials of a search: the trainer feeds the samples unchanged, so row
        ``indices`` of it (:meth:`TrainerCallback.on_batch`) is what the model would output on
        the batch, without running it."""
        return None if self.training_outputs_fn is None else self.training_outputs_fn(model)

    def settle_options(self, technique: str, options: Any) -> None:
        """Record that ``technique`` ended with ``options`` rather than those it was given (an
        iterative pruner that kept an earlier step, to stay within the budget): the trial's plan
        then names what the model went through, as it does for a quantizer run finer."""
        self.settled_options[technique] = options

    def accuracy(self, model: nn.Module) -> float | None:
        """Validation accuracy in [0, 1], or None without data."""
        return None if self.accuracy_fn is None else self.accuracy_fn(model)

    def calibration_batches(self, n_batches: int) -> Iterator[torch.Tensor]:
        """Input batches from the training split (random inputs when there is no data)."""
        if self.calibration_fn is not None:
            yield from self.calibration_fn(n_batches)
            return
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(n_batches):
            yield torch.randn((8, *self.input_shape), generator=generator)

    def example_input(self) -> torch.Tensor:
        return torch.zeros((1, *self.input_shape))

    def add_training_callback(self, callback: TrainerCallback) -> None:
        self.callbacks.append(callback)


class Technique:
    """Base class of a compression technique; subclasses set the class attributes.

    Attributes:
        name: kebab-case, unique across plugins.
        stage: when the technique acts in a trial.
        claims: parts of the model the technique rewrites; overlapping claims exclude each other.
        Options: a frozen dataclass of the technique's options; its ``__post_init__`` validates.
        inherits_weights: an architecture rewrite that starts from the trained baseline's weights
            (the trial fine-tunes) rather than from scratch (the trial trains fully).
        order: position among the techniques of the same stage (smaller runs first): whole-block
            rewrites come before layer rewrites, which come before attachments and classifiers.
        paper: where the technique comes from, for ``autoshrink plugins``.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage]
    claims: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type] = NoOptions
    inherits_weights: ClassVar[bool] = True
    order: ClassVar[int] = 50
    paper: ClassVar[str] = ""

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        """Whether this technique can act on ``model``; the reason when it cannot."""
        return True, ""

    def search_space(self, trial) -> Any:
        """Sample options define-by-run from ``trial`` (names are scoped per technique)."""
        return self.Options()

    def apply(self, model: nn.Module, options: Any, ctx: TrialContext) -> nn.Module:
        """Return the changed model (may be ``model`` itself, changed in place)."""
        raise NotImplementedError

    def rebuild(self, model: nn.Module, options: Any, ctx: TrialContext) -> nn.Module:
        """Return a model with the structure ``apply`` produced, for loading saved weights.

        Architecture rewrites rebuild by rewriting again; techniques that keep the structure
        return the model unchanged. Techniques that change the module types otherwise override.
        """
        if self.stage is Stage.ARCHITECTURE:
            return self.apply(model, options, ctx)
        return model

    def finer(self, options: Any) -> Any | None:
        """For a quantizer: the options one step more precise than ``options`` (one more bit,
        say), or None at the finest. When the quantized model misses the budget that the trained
        model met, a search applies the finer options instead, step by step
        (autoshrink.finer_quantization); the default, None, keeps the options as sampled."""
        return None

    def parse_options(self, values: Mapping[str, str]) -> Any:
        """Build typed options from strings (``--apply name:key=value``)."""
        return parse_options(self, values)

    def __repr__(self) -> str:
        return f"<technique {self.name} ({self.stage.label})>"


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # no ',', ':', '=' or spaces


def declaration_problem(technique: Technique) -> str | None:
    """What is wrong with a technique's class attributes, in words, or None. Checked as a
    plugin registers it: a stage given as text, claims given as one string or options that are
    not a dataclass otherwise surface in the middle of a search, or only when a finished
    trial's model file is loaded again (its options checked against ``Options``)."""
    name = getattr(technique, "name", None)
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return (f"its name is {name!r}; set name to kebab-case text such as 'my-technique'"
                " (letters, digits and hyphens: names go into --techniques a,b and --set"
                " NAME:OPTION=VALUE)")
    stage = getattr(technique, "stage", None)
    if not isinstance(stage, Stage):
        return (f"its stage is {stage!r}; set stage to one of"
                f" {', '.join(f'Stage.{s.name}' for s in Stage)} (from autoshrink import Stage)")
    claims = technique.claims
    if not isinstance(claims, (set, frozenset)) or not all(isinstance(c, str) for c in claims):
        return (f"its claims are {claims!r}; set claims to a frozenset of names, e.g."
                " frozenset({'weight-sparsity'})")
    options = technique.Options
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        return (f"its Options is {options!r}; set Options to the dataclass its search_space"
                " returns (frozen, with a default for every field)")
    return None


def option_assignments(text: str) -> dict[str, str]:
    """Options written ``key=value, key=value`` (in a plan step's parentheses, after ``inspect
    --apply TECH:``) as strings for :func:`parse_options`; an item without ``=`` is refused."""
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals:
            raise OptionError(f"option {item!r} is not OPTION=VALUE")
        values[key.strip()] = value.strip()
    return values


def options_to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)


def parse_options(technique: Technique, values: Mapping[str, Any]) -> Any:
    """Typed options from a mapping of names to strings or values; unknown keys are refused."""
    fields = {f.name: f for f in dataclasses.fields(technique.Options)}
    typed: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise OptionError(
                f"technique {technique.name!r} has no option {key!r}; its options are: {known}"
            )
        typed[key] = _convert(technique.name, key, raw, fields[key].type)
    return technique.Options(**typed)


def _convert(technique: str, key: str, raw: Any, annotation: Any) -> Any:
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""), str
    )
    if not isinstance(raw, str):
        return raw
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        return kind(raw)
    except ValueError:
        wanted = {bool: "true or false", int: "a whole number", float: "a number"}[kind]
        raise OptionError(
            f"option {key}={raw!r} of technique {technique!r} must be {wanted}"
        ) from None


# ``TrialContext.finetune(max_epochs=RECIPE_EPOCHS)`` means the recipe's --finetune-epochs, as
# None does: an int option can default to it (options are parsed by type and cannot be None)
RECIPE_EPOCHS = -1


def copy_or_none(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` to go back to, or None where it cannot be copied (such as a
    third-party pruning mask's tensors, which are not leaves of the graph)."""
    try:
        return copy.deepcopy(model)
    except Exception:
        return None


def check_range(technique: str, key: str, value: float, low: float, high: float) -> None:
    """Raise OptionError unless ``low <= value <= high``; used by Options.__post_init__."""
    if not low <= value <= high:
        raise OptionError(
            f"option {key}={value!r} of technique {technique!r} is out of range;"
            f" use a value between {low} and {high}"
        )


def check_choice(technique: str, key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise OptionError(
            f"option {key}={value!r} of technique {technique!r} is not allowed;"
            f" choose one of: {', '.join(map(str, choices))}"
        )
