"""A task is what a study is about: a model family, data splits and a training recipe.

Its baseline (the uncompressed model, trained once) is cached on disk under a key that hashes
everything that could change it, so re-running or resuming a search never retrains it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from autoshrink import artifact
from autoshrink.checkpoint import Checkpoints, kept_only_if_interrupted
from autoshrink.config import SearchConfig
from autoshrink.data import Splits, make_splits, read_dataset
from autoshrink.errors import BaselineDidNotLearn, DataError, TrialFailed, UsageError
from autoshrink.metrics import count_macs, count_params, cpu_latency_ms
from autoshrink.models import ModelSpec, check_takes_input
from autoshrink.plugins import PluginHost
from autoshrink.recipe import Recipe
from autoshrink.train import Trainer

log = logging.getLogger(__name__)

BASELINE_VERSION = 1  # bump when baseline training changes meaning
# the recipe's settings of candidates' training, which the baseline's does not read
FINE_TUNING_RECIPE = ("finetune_epochs", "finetune_lr")
SIGNIFICANCE = 0.01  # of the learned-baseline test (check_learned)


def cache_root() -> Path:
    env = os.environ.get("AUTOSHRINK_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "autoshrink"


def check_cache_writable() -> None:
    """Refuse a cache folder that cannot be written before anything is trained or stored: the
    baseline is kept there, and a search failed on it with a traceback after creating its
    study."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as error:
        raise UsageError(f"cache folder {str(root)!r} cannot be written ({error.strerror});"
                         " set AUTOSHRINK_CACHE_DIR to a folder you can write to") from None


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The trained uncompressed model's measurements (accuracies in [0, 1])."""

    val_accuracy: float
    test_accuracy: float
    params: int
    nonzero_params: int
    macs: int
    size_bytes: int
    latency_ms: float
    train_seconds: float  # with what interrupted runs spent up to the checkpoint it went on from

    def metric(self, name: str) -> float:
        return {"params": self.nonzero_params, "flops": self.macs, "size": self.size_bytes}[name]


@dataclasses.dataclass
class Task:
    model_spec: ModelSpec
    splits: Splits
    recipe: Recipe
    seed: int
    dataset: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.splits.input_shape

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        c, h, _ = self.input_shape
        return self.model_spec.build(self.splits.num_classes, c, h)

    def checked_model(self) -> nn.Module:
        """``build_model``, refused with a clear line when the model cannot classify the
        task's images (a user callable that returns no module, or one built for another
        size)."""
        model = self.build_model()
        check_takes_input(model, self.model_spec.name, self.splits.num_classes,
                          self.input_shape)
        return model

    def key(self) -> str:
        """Hash of everything that determines the task's results: the baseline and how
        candidates fine-tune. A study keeps it, to refuse trials of another task."""
        return self._hash(dataclasses.asdict(self.recipe))

    def baseline_key(self) -> str:
        """Hash of what determines the baseline alone, naming its cache entry: tasks that
        differ only in how candidates fine-tune share it (a search with another
        --finetune-epochs trained its baseline again, hours for VGG-19 on a CPU)."""
        recipe = dataclasses.asdict(self.recipe)
        for name in FINE_TUNING_RECIPE:
            del recipe[name]
        return self._hash(recipe)

    def _hash(self, recipe: dict) -> str:
        if recipe["precision"] == "auto":  # the default keeps the keys of earlier studies
            del recipe["precision"]
        payload = json.dumps({
            "model": self.model_spec.name, "dataset": self.dataset,
            "data": self.splits.fingerprint(), "recipe": recipe,
            "seed": self.seed, "version": BASELINE_VERSION,
        }, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """What identifies the task in a study, to refuse mixing results of different tasks."""
        return {"model": self.model_spec.name, "dataset": self.dataset, "key": self.key(),
                "input_shape": list(self.input_shape), "num_classes": self.splits.num_classes}


def load_task(config: SearchConfig, host: PluginHost) -> Task:
    model_spec = host.model(config.model)
    dataset_spec, argument = host.dataset(config.dataset)
    data_dir = Path(argument or config.data_dir) if (argument or config.data_dir) else None
    if data_dir is not None and not data_dir.is_dir():
        fix = (f"give an existing folder after '{config.dataset.partition(':')[0]}:'"
               if argument else "pass an existing folder with --data-dir")
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise UsageError(f"data directory {str(data_dir)!r} {what}; {fix}")
    try:
        raw = read_dataset(dataset_spec, data_dir, config.input_size)
    except DataError:
        raise
    except Exception as error:  # a loader that crashes on damaged files: say which data
        fix = ("check or replace its files" if data_dir else
               "it was given no folder: pass the one holding its files with --data-dir")
        where = f" from {str(data_dir)!r}" if data_dir else ""
        raise DataError(f"dataset {config.dataset!r} could not be read{where}"
                        f" ({type(error).__name__}: {error}); {fix}") from None
    raw.check(config.dataset)
    height, width = raw.train_x.shape[-2:]
    input_size = (config.input_size if config.input_size is not None
                  else max(height, width, model_spec.min_input_size))
    if height != width:
        log.warning(f"the images are {height}x{width} pixels and the models take squares: they"
                    f" are stretched to {input_size}x{input_size}; pad or crop them in the"
                    " loader to keep their proportions")
    model_spec.check_input_size(input_size, f"--input-size {input_size}")
    _check_fits_in_memory(raw, input_size, model_spec.in_channels)
    splits = make_splits(raw, seed=config.seed, val_fraction=config.val_fraction,
                         input_size=input_size, in_channels=model_spec.in_channels)
    if config.proxy_data is not None:
        splits = splits.with_train_subset(config.proxy_data, config.seed)
    return Task(model_spec, splits, config.task_recipe, config.seed, config.dataset)


def _check_fits_in_memory(raw, input_size: int, in_channels: int | None) -> None:
    """Refuse an input size at which the images would not fit in memory (a 1000 typed for
    100): every search process holds them as float32, and preparing them takes about three
    times that for a moment. Without this, the machine runs out of memory minutes later."""
    from autoshrink.environment import physical_memory  # loads Optuna: not at plugin discovery

    total = physical_memory()
    images = len(raw.train_x) + (0 if raw.test_x is None else len(raw.test_x))
    channels = in_channels or raw.train_x.shape[1]
    held = images * channels * input_size**2 * 4
    if total is not None and held > total / 4:
        raise UsageError(f"--input-size {input_size}: the {images:,} images would take"
                         f" {held / 2**30:.1f} GiB as float32 in each search process, more"
                         f" than a quarter of this machine's {total / 2**30:.0f} GiB; use a"
                         " smaller --input-size")


@contextlib.contextmanager
def _exclusive(lock_file: Path):
    """Hold an exclusive lock on ``lock_file`` (released by the kernel if the process dies)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def load_or_train_baseline(task: Task, progress=None) -> tuple[nn.Module, Baseline]:
    """The trained baseline model and its metrics, from the cache when present.

    Workers of one machine that start together wait on a lock: one trains, the others load.
    """
    folder = baseline_folder(task)
    weights, metrics_file = folder / "weights.pt", folder / "metrics.json"
    with _exclusive(folder / ".lock"):
        model = task.build_model()
        if weights.exists() and metrics_file.exists():
            try:
                model.load_state_dict(artifact.load_state_dict(weights))
                baseline = Baseline(**json.loads(metrics_file.read_text()))
                _check_finite(model)
            except Exception:  # a damaged cache entry is trained again, not trusted
                model = task.build_model()
            else:
                check_learned(task, baseline.val_accuracy)  # cached before this check existed
                return model.eval(), baseline
        return _train_baseline(task, model, folder, progress)


def baseline_folder(task: Task) -> Path:
    """The baseline's cache entry. One cached under the task's key, as entries were before
    the fine-tuning settings left the baseline's key, is used where there is none under
    the baseline's."""
    root = cache_root() / "baselines"
    folder, earlier = root / task.baseline_key(), root / task.key()
    if not (folder / "weights.pt").exists() and (earlier / "weights.pt").exists():
        return earlier
    return folder


def _check_finite(model: nn.Module) -> None:
    """Raise if a weight is NaN or infinite: bf16 training on the CPU could leave such values
    where a strided convolution's taps never met its input (autoshrink.strided_conv), and
    evaluation never read them, but quantizers do."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{name} holds values that are not finite")


def clearly_learned(accuracy: float, labels: torch.Tensor) -> tuple[bool, float]:
    """Whether ``accuracy`` on images of ``labels`` is clearly better than always answering
    their most common class, and that class's share.

    "Clearly" is an exact one-sided binomial test: a model right on each image with that
    class's share as its chance would score this well less than 1 % of the time. A split too
    small for any score to pass it (two classes on 6 images) passes above halfway from that
    share to every answer right. Three standard errors, the rule before, refused 65 % on 20
    images of three classes (a chance of 0.6 %)."""
    from scipy.stats import binom  # loaded already by the data split (scikit-learn)

    images = len(labels)
    share = torch.bincount(labels).max().item() / images
    right = round(accuracy * images)
    return binom.sf(right - 1, images, share) < SIGNIFICANCE or accuracy > (1 + share) / 2, share


def standard_error_pp(accuracy: float, images: int) -> float:
    """The standard error of an accuracy measured on ``images`` images, in percentage points.

    The accuracy is taken at least one image away from 0 and 1: at 100 % the formula gives 0,
    and two validation images at 100 % read "measure accuracy to about 0.0 pp"."""
    accuracy = min(max(accuracy, 1 / images), 1 - 1 / images)
    return 100 * math.sqrt(accuracy * (1 - accuracy) / images)


def weak_baseline_warning(baseline_accuracy: float, trial_accuracy: float, trial: int,
                          images: int, budget: float, epochs: int) -> str | None:
    """Say so when a trial beats the baseline by more than the budget (and by more than three
    standard errors, so not by luck): its fine-tuning, started from the baseline's weights,
    trained on where the baseline stopped short, so the budget counts down from too low a
    point and plans that lose accuracy against a well-trained model pass it. Seen with
    ``--epochs 4`` on digits: a 45.8 % baseline, trials at 78-83 %, all "within budget"."""
    excess = (trial_accuracy - baseline_accuracy) * 100
    if excess <= max(budget, 3 * standard_error_pp(baseline_accuracy, images)):
        return None
    return (f"trial {trial} scored {excess:.1f} pp above the baseline ({trial_accuracy:.2%}"
            f" against {baseline_accuracy:.2%} validation accuracy), more than the {budget:g}"
            f" pp budget: the baseline looks undertrained ({epochs} epochs), so the budget"
            " counts from too low a point; train it longer in a new study (more --epochs,"
            " another --out or --study-name)")


def coarse_budget_warning(val_accuracy: float, images: int, budget: float) -> str | None:
    """Say so when the validation split is too small to judge the budget: when two standard
    errors of the baseline's accuracy, or two images, come to more than the budget, a trial
    passes or misses it by the luck of a few images."""
    step = 100 / images
    error = standard_error_pp(val_accuracy, images)
    if max(2 * error, 2 * step) <= budget:
        return None
    return (f"the {images} validation images measure accuracy to about {error:.1f} pp (one"
            f" image is {step:.2f} pp), coarse for a {budget:g} pp budget: trials will pass or"
            " miss it by chance; give the dataset more images, or allow a larger drop")


def check_learned(task: Task, val_accuracy: float) -> None:
    """Refuse a baseline not clearly better than always answering the validation split's most
    common class: every plan would then be "within budget" of it, and the search would report
    reductions of a model that never worked (a learning rate too high for the batch size
    diverges to that)."""
    labels = task.splits.val.y
    learned, share = clearly_learned(val_accuracy, labels)
    if not learned:
        recipe = task.recipe
        raise BaselineDidNotLearn(
            f"the baseline {task.model_spec.name} reached {val_accuracy:.1%} validation accuracy"
            f" on {task.dataset}, not clearly better than always answering its most common"
            f" class ({share:.1%} of {len(labels)} images): it did not learn; lower"
            f" the learning rate ([recipe] lr = {recipe.lr:g} in a study preset), train longer"
            f" (now --epochs {recipe.epochs}) or check the data's labels")


def _train_baseline(task: Task, model: nn.Module, folder: Path,
                    progress) -> tuple[nn.Module, Baseline]:
    weights, metrics_file = folder / "weights.pt", folder / "metrics.json"
    macs = count_macs(model, task.input_shape)  # training changes weights, not the count
    trainer = Trainer(task.splits, task.recipe, seed=task.seed, task_macs=macs)
    # a long baseline (VGG-19 on a large dataset) stopped part-way goes on in the next run
    checkpoints = Checkpoints("baseline", stem=folder / "training")
    start = time.perf_counter()
    try:
        with kept_only_if_interrupted(checkpoints):
            trainer.fit(model, epochs=task.recipe.epochs, lr=task.recipe.lr, progress=progress,
                        checkpoint=checkpoints.next_training("training"))
    except TrialFailed as error:  # a loss that diverged: the recipe's fault, not a trial's
        raise BaselineDidNotLearn(f"the baseline {task.model_spec.name} did not train on"
                                  f" {task.dataset} ({error}); lower the learning rate"
                                  f" ([recipe] lr = {task.recipe.lr:g} in a study preset)"
                                  ) from None
    seconds = time.perf_counter() - start + checkpoints.earlier_s  # all runs' training
    val_accuracy = trainer.accuracy(model, task.splits.val)
    check_learned(task, val_accuracy)  # before the cache, which would keep it
    params, nonzero_params = count_params(model)
    size = artifact.save(model, folder / "weights.tmp")
    baseline = Baseline(
        val_accuracy=val_accuracy,
        test_accuracy=trainer.accuracy(model, task.splits.test),
        params=params, nonzero_params=nonzero_params, macs=macs,
        size_bytes=size, latency_ms=cpu_latency_ms(model, task.input_shape),
        train_seconds=seconds,
    )  # the model is on the CPU now (the latency), as one loaded from the cache is
    metrics_tmp = folder / "metrics.tmp"
    metrics_tmp.write_text(json.dumps(dataclasses.asdict(baseline), indent=2))
    os.replace(metrics_tmp, metrics_file)
    os.replace(folder / "weights.tmp", weights)  # the weights appear last, whole
    return model.eval(), baseline
