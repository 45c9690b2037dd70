"""A search's settings: defaults, a TOML preset from ``studies/``, then command-line flags.

Every value is validated here, once, with a message that quotes it and says what would work.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from autoshrink.errors import UsageError
from autoshrink.recipe import PRECISIONS, Recipe, available_cores

OBJECTIVES = ("params", "flops", "size")
SAMPLERS = ("tpe", "random")
# data splits and samplers take seeds below 2**32; the search adds trial numbers to its seed
MAX_SEED = 2**31 - 1
TRIALS_PER_WORKER = 8
STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
RUN_FOLDER_MARK = ".autoshrink-study"  # in a run folder: the name of the study it belongs to


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    model: str = "smallcnn"
    dataset: str = "digits"
    data_dir: str | None = None
    max_drop: float = 5.0
    objectives: tuple[str, ...] = ("params",)
    n_trials: int = 40
    n_jobs: int | None = None  # local worker processes sharing the study; None: see workers
    sampler: str = "tpe"  # "random" for comparisons
    early_abort: bool = True
    proxy_data: float | None = None  # search on this share of the training data...
    proxy_epochs: float | None = None  # ...and/or this share of the epochs, then confirm
    proxy_max_drop: float | None = None  # the proxy's own budget; None: max_drop
    # shares of the recipe's epochs a trial may train for, one picked per trial by the sampler;
    # the full length is offered only when asked for: it took over half of a default search's
    # trial time and its fronts were no better (docs/performance.md, "The full training length")
    training_lengths: tuple[float, ...] = (0.25, 0.5)
    timeout: float | None = None
    techniques: tuple[str, ...] = ()  # empty: every installed technique
    exclude: tuple[str, ...] = ()
    study_name: str | None = None
    storage: str | None = None
    seed: int = 0
    out: str | None = None
    val_fraction: float = 0.2
    input_size: int | None = None  # None: the dataset's own size, raised to the model's minimum
    # technique -> {option: value} held fixed instead of searched ("--set", [options.<name>])
    fixed_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # plans measured first, as reports spell them (autoshrink.start_plans)
    start_plans: tuple[str, ...] = ()
    recipe: Recipe = Recipe()

    def __post_init__(self) -> None:
        if not 0 <= self.max_drop <= 100:
            raise UsageError(f"--max-drop {self.max_drop} is outside 0..100; it is in accuracy"
                             " percentage points below the baseline, e.g. --max-drop 5")
        if self.n_trials < 1:
            raise UsageError(f"--n-trials {self.n_trials} must be at least 1")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed {self.seed} is outside 0..{MAX_SEED:,}; use e.g. --seed 1")
        if self.n_jobs is not None and self.n_jobs < 1:
            raise UsageError(f"--n-jobs {self.n_jobs} must be at least 1 (worker processes)")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler {self.sampler!r} is unknown; choose one of:"
                             f" {', '.join(SAMPLERS)}")
        for key in ("proxy_data", "proxy_epochs"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                raise UsageError(f"--{key.replace('_', '-')} {value} must be in (0, 1], a share"
                                 " of the full task, e.g. 0.25")
        if self.is_proxy and (self.proxy_data or 1) == 1 and (self.proxy_epochs or 1) == 1:
            given = " ".join(f"--{key.replace('_', '-')} {getattr(self, key):g}"
                             for key in ("proxy_data", "proxy_epochs")
                             if getattr(self, key) is not None)
            raise UsageError(f"{given} makes the proxy the full task, so every candidate would"
                             " train twice; give a share below 1, e.g. --proxy-data 0.25")
        if self.proxy_max_drop is not None:
            if not self.is_proxy:
                raise UsageError(f"--proxy-max-drop {self.proxy_max_drop} needs a proxy search;"
                                 " add --proxy-data SHARE and/or --proxy-epochs SHARE")
            if not 0 <= self.proxy_max_drop <= 100:
                raise UsageError(f"--proxy-max-drop {self.proxy_max_drop} is outside 0..100; it"
                                 " is in percentage points below the proxy's baseline, e.g."
                                 " --proxy-max-drop 1")
        if not self.training_lengths:
            raise UsageError("--training-lengths is empty; use e.g. --training-lengths 0.25,0.5,1")
        for length in self.training_lengths:
            if isinstance(length, bool) or not isinstance(length, (int, float)) \
                    or not 0 < length <= 1:
                raise UsageError(f"--training-lengths value {length!r} must be a share of the"
                                 " recipe's epochs in (0, 1], e.g. --training-lengths 0.25,0.5,1")
        if len(set(self.training_lengths)) != len(self.training_lengths):
            raise UsageError(f"--training-lengths {lengths_text(self.training_lengths)} names"
                             " one twice")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError(f"--timeout {self.timeout} must be a positive number of seconds")
        if self.input_size is not None and self.input_size < 1:
            raise UsageError(f"--input-size {self.input_size} must be a positive number of pixels,"
                             " e.g. --input-size 32")
        for text in self.start_plans:
            if not isinstance(text, str) or not text.strip():
                raise UsageError(f"starting plan {text!r} is not a plan; give one as reports"
                                 " print it, e.g. --start-plan 'prune-l1(amount=0.5, steps=3)'")
        if not self.objectives:
            raise UsageError("--objectives is empty; use e.g. --objectives params,flops,size")
        for objective in self.objectives:
            if objective not in OBJECTIVES:
                raise UsageError(f"unknown objective {objective!r}; choose from"
                                 f" {', '.join(OBJECTIVES)} (e.g. --objectives params,size)")
        if len(set(self.objectives)) != len(self.objectives):
            raise UsageError(f"--objectives {','.join(self.objectives)} names one twice")
        if not 0 < self.val_fraction < 0.5:
            raise UsageError(f"val_fraction {self.val_fraction} must be between 0 and 0.5")
        if self.study_name is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*",
                                                            self.study_name):
            raise UsageError(f"--study-name {self.study_name!r} may hold only letters, digits,"
                             " '.', '_' and '-'")
        recipe = self.recipe
        for key in ("epochs", "finetune_epochs", "batch_size"):
            if getattr(recipe, key) < 1:
                flag = f"--{key.replace('_', '-')} or " if key != "batch_size" else ""
                raise UsageError(f"{key} {getattr(recipe, key)} ({flag}[recipe] {key}) must be"
                                 " at least 1")
        for key in ("lr", "finetune_lr"):
            if not getattr(recipe, key) > 0:
                raise UsageError(f"recipe {key} = {getattr(recipe, key)} must be positive")
        if recipe.precision not in PRECISIONS:
            raise UsageError(f"precision {recipe.precision!r} is unknown; set --precision or"
                             f" [recipe] precision to one of: {', '.join(PRECISIONS)}")

    @property
    def name(self) -> str:
        if self.study_name:
            return self.study_name
        slug = re.sub(r"[^\w.-]+", "-", f"{self.dataset}-{self.model}").strip("-")
        return slug

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    @property
    def is_proxy(self) -> bool:
        return self.proxy_data is not None or self.proxy_epochs is not None

    @property
    def budget(self) -> float:
        """The accuracy drop (pp) this study's trials must stay within: ``proxy_max_drop`` in a
        proxy search that sets one (a proxy's drops can understate the full task's), else
        ``max_drop``."""
        if self.is_proxy and self.proxy_max_drop is not None:
            return self.proxy_max_drop
        return self.max_drop

    @property
    def task_recipe(self) -> Recipe:
        """The recipe trials train with: shortened by ``proxy_epochs`` in a proxy search."""
        if self.proxy_epochs is None:
            return self.recipe
        scale = lambda epochs: max(1, round(epochs * self.proxy_epochs))  # noqa: E731
        return dataclasses.replace(self.recipe, epochs=scale(self.recipe.epochs),
                                   finetune_epochs=scale(self.recipe.finetune_epochs))

    @property
    def workers(self) -> int:
        """``--n-jobs`` (no more than ``--n-trials``: a process without a trial to run only
        takes memory and cores from those with one), or by default one worker process per
        core once each has ``TRIALS_PER_WORKER`` trials to run.

        The small models of a search train barely faster on two threads than on one (tiny
        operations do not split well), so trials side by side on one thread each finish about
        twice as many per hour; starting a worker costs a few seconds, which only pays off
        over several trials.
        """
        if self.n_jobs is not None:
            return min(self.n_jobs, self.n_trials)
        return max(1, min(available_cores(), self.n_trials // TRIALS_PER_WORKER))

    def confirmation(self, n_trials: int) -> SearchConfig:
        """The full-scale settings that re-run a proxy search's Pareto candidates: its own
        study (``<name>-confirmed``) in the ``confirmed`` sub-folder of the run folder. Each
        candidate is a full training, worth a worker of its own."""
        n_jobs = self.n_jobs or min(available_cores(), n_trials)
        return dataclasses.replace(self, proxy_data=None, proxy_epochs=None, proxy_max_drop=None,
                                   start_plans=(),
                                   study_name=f"{self.name}-confirmed", n_trials=n_trials,
                                   n_jobs=n_jobs, out=str(self.run_dir / "confirmed"))

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.run_dir / 'study.db').resolve()}"


# field name -> its annotation (a string: this module uses postponed annotations)
_SEARCH_KEYS = {f.name: f.type for f in dataclasses.fields(SearchConfig)
                if f.name not in ("recipe", "fixed_options")}
_RECIPE_KEYS = {f.name: f.type for f in dataclasses.fields(Recipe)}
_TOML_TYPES = {  # the leading type of an annotation -> (TOML values accepted, how to say it)
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "tuple": ((list, str), "a list of names or a comma-separated string"),
}


def resolve_study_file(reference: str) -> Path:
    """A preset name from ``studies/`` or a path to a TOML file."""
    path = Path(reference)
    if path.suffix != ".toml":
        path = STUDIES_DIR / f"{reference}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))
        raise UsageError(f"study preset {reference!r} not found; use a .toml path or one of:"
                         f" {', '.join(known) or 'none'}")
    return path


def load_preset(reference: str) -> dict[str, Any]:
    """Settings from a TOML preset: a [search] table, optional [recipe] and [options.<name>]
    tables (the last hold a technique's options fixed; checked against the technique later)."""
    path = resolve_study_file(reference)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"study preset {path} is not valid TOML: {error}") from None
    unknown_tables = set(data) - {"search", "recipe", "options"}
    if unknown_tables:
        raise UsageError(f"study preset {path} has unknown table(s) {sorted(unknown_tables)};"
                         " only [search], [recipe] and [options.<technique>] are read")
    settings = dict(data.get("search", {}))
    _check_keys(path, "search", settings, _SEARCH_KEYS)
    recipe = dict(data.get("recipe", {}))
    _check_keys(path, "recipe", recipe, _RECIPE_KEYS)
    if recipe:
        settings["recipe"] = recipe
    options = data.get("options", {})
    for name, values in options.items():
        if not isinstance(values, dict):
            raise UsageError(f"study preset {path}: options.{name} must be a table of a"
                             f" technique's options, e.g. [options.{name}]")
    if options:
        settings["fixed_options"] = {name: dict(values) for name, values in options.items()}
    return settings


def _check_keys(path: Path, table: str, values: dict, fields: dict[str, str]) -> None:
    """Unknown keys and values of the wrong type, named with the table they are in."""
    unknown = set(values) - set(fields)
    if unknown:
        raise UsageError(f"study preset {path} has unknown key(s) {sorted(unknown)} in"
                         f" [{table}]; allowed: {', '.join(sorted(fields))}")
    for key, value in values.items():
        accepted, wanted = _TOML_TYPES[fields[key].split(" ")[0].split("[")[0]]
        if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
            raise UsageError(f"study preset {path}: [{table}] {key} = {value!r} must be"
                             f" {wanted}")


def config_to_json(config: SearchConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str, **overrides: Any) -> SearchConfig:
    """The settings a study was created with (stored on it), with ``overrides`` applied."""
    settings = json.loads(text)
    settings["recipe"] = Recipe(**settings["recipe"])
    # studies made before training lengths existed lack the key: they trained whole runs
    settings.setdefault("training_lengths", [1.0])
    settings.setdefault("proxy_max_drop", None)  # and before the proxy had its own budget
    settings.setdefault("start_plans", [])  # and before starting plans
    for key in ("objectives", "techniques", "exclude", "training_lengths", "start_plans"):
        settings[key] = tuple(settings[key])
    settings.update(overrides)
    return SearchConfig(**settings)


# settings that decide the task (its data and baseline), with the flag that sets each
TASK_FLAGS = {"seed": "--seed", "input_size": "--input-size", "data_dir": "--data-dir",
              "val_fraction": "[search] val_fraction", "proxy_data": "--proxy-data",
              "proxy_epochs": "--proxy-epochs"}
RECIPE_FLAGS = {"epochs": "--epochs", "finetune_epochs": "--finetune-epochs",
                "precision": "--precision"}  # the others are set in a preset's [recipe]


def task_setting_differences(created: SearchConfig, config: SearchConfig) -> list[str]:
    """The task settings in which ``config`` differs from the study's ``created``, as
    'FLAG NEW instead of OLD' phrases."""
    pairs = [(flag, getattr(created, key), getattr(config, key))
             for key, flag in TASK_FLAGS.items()]
    pairs += [(RECIPE_FLAGS.get(key, f"[recipe] {key}"), value,
               getattr(config.recipe, key))
              for key, value in dataclasses.asdict(created.recipe).items()]
    return [f"{flag} {_shown(new)} instead of {_shown(old)}" for flag, old, new in pairs
            if old != new]


def _shown(value: Any) -> str:
    if value is None:
        return "the default"
    return repr(value) if isinstance(value, str) else f"{value:g}"


def parse_fixed_options(items: list[str]) -> dict[str, dict[str, str]]:
    """``TECH:KEY=VALUE`` strings (``--set``) as {technique: {option: value}}."""
    fixed: dict[str, dict[str, str]] = {}
    for item in items:
        name, colon, assignment = item.partition(":")
        key, equals, value = assignment.partition("=")
        if not (colon and equals and name.strip() and key.strip()):
            raise UsageError(f"--set {item!r} is not TECHNIQUE:OPTION=VALUE; use e.g."
                             " --set prune-l1:amount=0.3")
        fixed.setdefault(name.strip(), {})[key.strip()] = value.strip()
    return fixed


def lengths_text(lengths: tuple[float, ...]) -> str:
    """Training lengths as the option spells them: ``0.25,0.5,1``."""
    return ",".join(f"{length:g}" for length in lengths)


def _share(value: Any) -> Any:
    """A training length given as text (``--training-lengths 0.25,0.5,1``) as a number;
    anything else is left for the settings' own check to refuse with the value in its message."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise UsageError(f"--training-lengths value {value!r} is not a number; use shares"
                             " of the recipe's epochs, e.g. --training-lengths 0.25,0.5,1"
                             ) from None
    return value


def build_config(preset: str | None, overrides: dict[str, Any]) -> SearchConfig:
    """Defaults <- preset <- overrides (None values in ``overrides`` are ignored); fixed
    options from both are merged, the command line's winning."""
    settings: dict[str, Any] = load_preset(preset) if preset else {}
    recipe = dict(settings.pop("recipe", {}))
    fixed = settings.pop("fixed_options", {})
    overrides = dict(overrides)
    for name, values in (overrides.pop("fixed_options", None) or {}).items():
        fixed[name] = {**fixed.get(name, {}), **values}
    if fixed:
        settings["fixed_options"] = fixed
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _RECIPE_KEYS:
            recipe[key] = value
        else:
            settings[key] = value
    for key in ("objectives", "techniques", "exclude", "training_lengths"):
        if isinstance(settings.get(key), str):
            settings[key] = tuple(p.strip() for p in settings[key].split(",") if p.strip())
        elif key in settings:
            settings[key] = tuple(settings[key])
    if "training_lengths" in settings:
        settings["training_lengths"] = tuple(map(_share, settings["training_lengths"]))
    if "start_plans" in settings:  # plans hold commas: a string is one plan, not a list
        plans = settings["start_plans"]
        settings["start_plans"] = (plans,) if isinstance(plans, str) else tuple(plans)
    try:
        return SearchConfig(**settings, recipe=Recipe(**recipe))
    except TypeError as error:
        raise UsageError(f"bad study settings: {error}") from None
