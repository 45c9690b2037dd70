"""How redundant is a dataset's input? Seed 001's stages 1 and 2 (Gabbasov et al.).

Stage 1 trains the task's model on distorted copies of the images: each image is cut into 2x2
cells and in every cell 1, 2 or 3 of the 4 pixels (MH, CHB, GRI) are replaced by the image's
mean colour, black (suffix 0) or white (suffix 1); DN leaves the image as it is. Stage 2 leaves
the images alone and instead multiplies the 3x3 kernel of the input convolution, now with
stride 2, by a fixed binary mask (Figures 2-4 of the paper), which removes the same share of
pixel positions as MH0 / CHB0 / GRI0; the all-ones mask is the reference. Each variant is
trained on k folds of the training data (the test split stays untouched) with focal loss
(gamma 0.5 in the paper) and scored on the held-out fold: error, loss, macro precision, recall.

Decisions (the paper's "comparable or better", made precise): a variant is comparable when each
metric is no worse than the reference's fold mean by more than the reference's standard error
over the folds. Stage 1 finds redundancy when some distortion is comparable to DN in error and
loss; stage 2 then estimates the redundant fraction as the largest of 1/4, 1/2, 3/4 whose family
has a mask comparable to the reference in all four metrics (0 when none, or when stage 1 found no
redundancy). Deviations: our trainer's SGD one-cycle schedule instead of Adam, k folds of one
training split instead of three resampled sets, and for stage 2 the images are resized to twice
the model's input so that the stride-2 input convolution hands the rest of the network the map
size it was built for. In the cells, MH changes the bottom-right pixel, CHB the anti-diagonal
pair, GRI all but the top-left pixel (Figure 1's exact positions are not in the text).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold
from torch import nn
from torch.nn.utils import parametrize

from autoshrink.data import Split, Splits
from autoshrink.errors import BaselineDidNotLearn, UsageError
from autoshrink.losses import FocalLoss, focal_loss
from autoshrink.metrics import count_macs
from autoshrink.task import Task, clearly_learned
from autoshrink.train import Trainer

log = logging.getLogger(__name__)

# pixel positions (row, column) inside each 2x2 cell that a tiling replaces
CELL_PATTERNS = {"MH": ((1, 1),), "CHB": ((0, 1), (1, 0)), "GRI": ((0, 1), (1, 0), (1, 1))}
FILLS = {"": "mean", "0": 0.0, "1": 1.0}  # suffix -> replacement: image mean, black, white
FRACTIONS = {"MH": 0.25, "CHB": 0.5, "GRI": 0.75}
REFERENCE_MASK = "111111111"
MASKS = {  # Figures 2-4, read row by row from the top left
    "MH": ("010111010", "111101111", "101111101", "111010111"),
    "CHB": ("101010101", "010101010"),
    "GRI": ("101000101", "000010000", "010000010", "000101000"),
}
METRICS = {"error": -1, "loss": -1, "precision": 1, "recall": 1}  # sign: higher is better


def tile(x: torch.Tensor, pattern: str, fill: str | float, splits: Splits) -> torch.Tensor:
    """Images ``x`` (N, C, H, W, normalised) with the ``pattern`` pixels of every 2x2 cell
    replaced by each image's mean colour (``fill='mean'``) or the raw pixel value ``fill``."""
    out = x.clone()
    if fill == "mean":
        value = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        value = splits.pixel_value(float(fill)).to(x.dtype).expand_as(x)
    for row, column in CELL_PATTERNS[pattern]:
        out[:, :, row::2, column::2] = value[:, :, row::2, column::2]
    return out


def mask_kernel(code: str) -> torch.Tensor:
    """A 3x3 binary mask from its nine digits, read row by row from the top left."""
    if len(code) != 9 or set(code) - {"0", "1"}:
        raise ValueError(f"mask {code!r} is not nine binary digits")
    return torch.tensor([float(digit) for digit in code]).reshape(3, 3)


class KernelMask(nn.Module):
    """Weight parametrization: the kernel times a fixed mask, so masked taps stay zero and get
    no gradient."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def input_convolution(model: nn.Module) -> nn.Conv2d:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.kernel_size != (3, 3):
        raise UsageError("probe stage 2 needs a model whose first layer is a 3x3 convolution"
                         f" ({type(model).__name__} has"
                         f" {'none' if first is None else first.kernel_size}); pass --model")
    return first


def mask_input_convolution(model: nn.Module, code: str) -> nn.Module:
    """Give the model's 3x3 input convolution stride 2 and the binary mask ``code``."""
    conv = input_convolution(model)
    conv.stride = (2, 2)
    parametrize.register_parametrization(conv, "weight", KernelMask(mask_kernel(code)))
    return model


@dataclasses.dataclass(frozen=True)
class VariantResult:
    stage: int
    variant: str
    fraction: float  # share of pixel positions the variant removes (0 for the references)
    folds: dict[str, list[float]]  # metric -> one value per fold

    def mean(self, metric: str) -> float:
        return float(np.mean(self.folds[metric]))

    def standard_error(self, metric: str) -> float:
        values = self.folds[metric]
        return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0

    def comparable_to(self, reference: VariantResult, metrics: tuple[str, ...]) -> bool:
        """No worse than ``reference`` by more than its standard error, in every metric."""
        return all(
            METRICS[m] * (self.mean(m) - reference.mean(m)) >= -reference.standard_error(m)
            for m in metrics)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    variants: list[VariantResult]
    redundancy_found: bool
    fraction: float
    reason: str

    def rows(self) -> list[dict]:
        """One row per variant: fold means, and whether it is comparable to its reference."""
        references = {1: self.variant(1, "DN"), 2: self.variant(2, REFERENCE_MASK)}
        rows = []
        for v in self.variants:
            reference = references[v.stage]
            checked = ("error", "loss") if v.stage == 1 else tuple(METRICS)
            rows.append({"stage": v.stage, "variant": v.variant, "fraction": v.fraction,
                         **{m: round(v.mean(m), 4) for m in METRICS},
                         "comparable": v is not reference and v.comparable_to(reference,
                                                                              checked)})
        return rows

    def variant(self, stage: int, name: str) -> VariantResult:
        return next(v for v in self.variants if v.stage == stage and v.variant == name)


def check_options(folds: int, epochs: int, gamma: float) -> None:
    """Refuse settings the probe cannot run with, before any data is loaded."""
    if folds < 2:
        raise UsageError(f"--folds {folds} must be at least 2")
    if epochs < 1:
        raise UsageError(f"--epochs {epochs} must be at least 1")
    if gamma < 0:
        raise UsageError(f"--gamma {gamma:g} must be 0 or more (0 is plain cross-entropy;"
                         " the paper uses 0.5)")


def _fold_splits(task: Task, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k stratified folds over the training and validation data (the test split is kept)."""
    labels = torch.cat([task.splits.train.y, task.splits.val.y]).numpy()
    rarest = int(np.bincount(labels)[np.unique(labels)].min())
    if folds > rarest:  # every fold holds out images of every class
        raise UsageError(f"--folds {folds} is more than the {rarest} images of this data's"
                         f" rarest class outside the test split; use at most {rarest}")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def _score(model: nn.Module, trainer: Trainer, held: Split, gamma: float) -> dict:
    logits = trainer.outputs(model, held).cpu()
    predicted = logits.argmax(1).numpy()
    precision, recall, _, _ = precision_recall_fscore_support(
        held.y.numpy(), predicted, average="macro", zero_division=0)
    return {"error": float((predicted != held.y.numpy()).mean()),
            "loss": float(focal_loss(logits, held.y, gamma)),
            "precision": float(precision), "recall": float(recall)}


def evaluate_variant(task: Task, build: Callable[[], nn.Module],
                     transform: Callable[[torch.Tensor], torch.Tensor],
                     folds: list[tuple[np.ndarray, np.ndarray]], epochs: int,
                     gamma: float) -> dict[str, list[float]]:
    """Train a fresh model per fold on transformed images; metrics of each held-out fold."""
    x = transform(torch.cat([task.splits.train.x, task.splits.val.x]))
    y = torch.cat([task.splits.train.y, task.splits.val.y])
    results: dict[str, list[float]] = {m: [] for m in METRICS}
    for fold, (train_index, held_index) in enumerate(folds):
        train = Split(x[train_index].contiguous(), y[train_index])
        held = Split(x[held_index].contiguous(), y[held_index])
        splits = dataclasses.replace(task.splits, train=train, val=held, test=held)
        model = build()
        trainer = Trainer(splits, task.recipe, seed=task.seed + fold,
                          task_macs=count_macs(model, tuple(train.x.shape[1:])))
        trainer.fit(model, epochs=epochs, lr=task.recipe.lr, callbacks=[FocalLoss(gamma)])
        for metric, value in _score(model, trainer, held, gamma).items():
            results[metric].append(value)
    return results


def check_reference(name: str, scores: dict[str, list[float]], labels: torch.Tensor,
                    epochs: int) -> None:
    """Every verdict compares variants with a reference (DN, the all-ones mask): one no better
    than guessing makes the comparisons noise, and is refused before the other variants
    train; one that learned only part of the way gets a warning."""
    accuracy = 1 - float(np.mean(scores["error"]))
    learned, share = clearly_learned(accuracy, labels)
    said = (f"the reference variant {name} reached {accuracy:.1%} accuracy on the held-out"
            f" folds after {epochs} epochs")
    advice = f"train longer (now --epochs {epochs})"
    if not learned:
        raise BaselineDidNotLearn(f"{said}, not clearly better than always answering the most"
                                  f" common class ({share:.1%}): the variants cannot be told"
                                  f" apart; {advice}")
    if accuracy < (1 + share) / 2:
        log.warning(f"{said}, less than halfway from guessing ({share:.1%}) to every answer"
                    f" right: the verdict compares variants that barely trained; {advice}")


def stage_one_variants() -> list[tuple[str, str | None, str | float | None]]:
    """(name, pattern, fill) for DN and the nine tilings."""
    variants: list[tuple[str, str | None, str | float | None]] = [("DN", None, None)]
    for suffix, fill in FILLS.items():
        variants += [(pattern + suffix, pattern, fill) for pattern in CELL_PATTERNS]
    return variants


def stage_two_masks() -> list[tuple[str, float]]:
    """(mask, fraction) for the reference and the masks of Figures 2-4."""
    return [(REFERENCE_MASK, 0.0)] + [(code, FRACTIONS[family])
                                      for family, codes in MASKS.items() for code in codes]


def probe(task: Task, masked_task: Task, *, folds: int = 3, epochs: int = 10,
          gamma: float = 0.5) -> ProbeResult:
    """Run both stages. ``masked_task`` holds the same data at twice the model's input size,
    for the stride-2 masked input convolution of stage 2."""
    check_options(folds, epochs, gamma)
    input_convolution(task.checked_model())  # refuse an unsuitable model before any training
    folds_index = _fold_splits(task, folds, task.seed)  # same labels at both input sizes
    log.info(f"probing {task.dataset} with {task.model_spec.name}: {folds} folds, {epochs}"
             f" epochs per variant, focal loss gamma {gamma:g}")
    labels = torch.cat([task.splits.train.y, task.splits.val.y])  # each held out once
    variants = []
    stage_one = stage_one_variants()
    for i, (name, pattern, fill) in enumerate(stage_one, 1):
        transform = (lambda x: x) if pattern is None else (
            lambda x, p=pattern, f=fill: tile(x, p, f, task.splits))
        scores = evaluate_variant(task, task.build_model, transform, folds_index, epochs,
                                  gamma)
        variants.append(VariantResult(1, name, FRACTIONS.get(pattern, 0.0), scores))
        log.info(f"  stage 1 [{i}/{len(stage_one)}] {name:<5} error"
                 f" {np.mean(scores['error']) * 100:5.1f}%  loss {np.mean(scores['loss']):.4f}")
        if pattern is None:
            check_reference(name, scores, labels, epochs)
    c, size, _ = masked_task.input_shape
    masks = stage_two_masks()
    for i, (code, fraction) in enumerate(masks, 1):
        def build(code=code):
            torch.manual_seed(task.seed)
            model = masked_task.model_spec.build(task.splits.num_classes, c, size // 2)
            return mask_input_convolution(model, code)

        scores = evaluate_variant(masked_task, build, lambda x: x, folds_index, epochs, gamma)
        variants.append(VariantResult(2, code, fraction, scores))
        log.info(f"  stage 2 [{i}/{len(masks)}] mask {code}  error"
                 f" {np.mean(scores['error']) * 100:5.1f}%  precision"
                 f" {np.mean(scores['precision']):.3f}  recall {np.mean(scores['recall']):.3f}")
        if code == REFERENCE_MASK:
            check_reference(f"mask {code}", scores, labels, epochs)
    return decide(variants)


def decide(variants: list[VariantResult]) -> ProbeResult:
    """The verdicts of both stages from measured variants."""
    by_name = {(v.stage, v.variant): v for v in variants}
    dn, reference = by_name[1, "DN"], by_name[2, REFERENCE_MASK]
    similar = [v.variant for v in variants
               if v.stage == 1 and v is not dn and v.comparable_to(dn, ("error", "loss"))]
    passing = [v for v in variants if v.stage == 2 and v is not reference
               and v.comparable_to(reference, tuple(METRICS))]
    if not similar:
        return ProbeResult(variants, False, 0.0, "no distortion of stage 1 trained as well as"
                           " the original images: no redundancy found, the method does not"
                           " apply to this data")
    if not passing:
        return ProbeResult(variants, True, 0.0, f"stage 1 found redundancy ({', '.join(similar)}"
                           " comparable to DN) but no input mask of stage 2 reproduced it")
    best = max(passing, key=lambda v: v.fraction)
    return ProbeResult(variants, True, best.fraction,
                       f"stage 1: {', '.join(similar)} comparable to DN; stage 2: mask"
                       f" {best.variant} comparable to {REFERENCE_MASK}")
