"""Studies as data: the TOML files beside this module, or a user's own file by path.

A study names its trials and how they run:

- ``kind = "grid"``: ``[[cells]]``, each a set of trial-config keys (plus ``name``, ``label``
  and the paper's reported accuracy per dataset); every cell runs once per seed and, on CK+
  with the ``kfold`` protocol, once per fold (and per drawing of the folds). ``[[contrasts]]``
  declare the comparisons the report makes, each a ``family`` (Holm-adjusted on its own), a
  ``label`` and the cells it adds (``plus``) and subtracts (``minus``), as many of each:
  ``plus = ["psa"], minus = ["none"]`` compares two cells, ``plus = ["psa_joint", "basic"],
  minus = ["psa", "joint"]`` is the interaction of a 2x2 design. Without them every cell is
  compared with ``reference`` (the first cell unless named).
- ``kind = "tune"``: a ``[tune]`` table (metric, mode, samples, ASHA's grace period and
  reduction factor) and a ``[[space]]`` list of parameters, each ``categorical``, ``uniform``,
  ``loguniform`` or ``int``, optionally active only ``when`` other parameters take given values.
  A multi-objective study names ``objectives = { best_val_accuracy = "max", latency_ms = "min" }``
  instead of metric and mode, and any study may name ``constraints = ["latency_ms <= 5"]``
  (``METRICS`` lists what trials report: validation figures and their architecture's cost).
- ``[run]``: dataset, data path, protocol (``auto``: k-fold on CK+, the official splits
  elsewhere), folds, repetitions (repeated k-fold: each repetition re-draws the subject folds;
  1, one split, is the default and what the report's level table recommends), seeds;
  ``[defaults]``: config keys for every trial; ``[presets.NAME]``: config keys (and ``tune``
  settings, and ``seeds``, which ``--seeds`` overrides) of a named preset, ``paper`` and
  ``cpu`` in the shipped studies.

Every key is checked on load, and every value Ray Tune or Optuna would refuse later is refused
here instead, before anything runs; an error names the file, the key and the problem:

- unknown keys, wrong TOML types, and trial configs that ``TrialConfig`` refuses, for every
  combination of ``[defaults]``, each preset and every grid cell;
- ``paper``: keys must be datasets this project knows (``fermodel.config.DATASETS``), values
  accuracies in percent;
- ``[tune]`` and ``[presets.NAME.tune]``: a metric the trainable reports, mode max or min
  (the same for each objective and constraint; objectives not beside metric or mode),
  ``num_samples`` and ``grace_period`` at least 1, ``reduction_factor`` at least 2 (ASHA asserts
  it), and a grace period below the last epoch of every preset (ASHA's first rung is at the
  grace period; one at or past the last epoch never stops anything); a grid study has no tune
  settings;
- ``[[space]]``: ``int`` bounds are TOML integers, ``uniform``/``loguniform`` bounds finite
  numbers (``loguniform`` above 0) and not on an integer key, categorical choices distinct and
  of the TOML type the key takes, ``when`` a non-empty list of an earlier parameter's choices;
  a tuned key must not change the data every trial reads (``DATASET_KEYS``): a tuning study
  loads its dataset once, on the driver, from the base config.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

from fermodel.config import (
    DATA_KEYS,
    DATASETS,
    PLACE_KEYS,
    SPLIT_KEYS,
    ConfigError,
    TrialConfig,
)

STUDY_DIR = Path(__file__).parent / "studies"
KINDS = ("grid", "tune")
PARAM_TYPES = ("categorical", "uniform", "loguniform", "int")
TRIAL_KEYS = {f for f in TrialConfig.__dataclass_fields__}
FIELD_TYPES = typing.get_type_hints(TrialConfig)
TYPE_NAMES = {int: "integers", float: "finite numbers", bool: "true or false", str: "strings"}
# keys the study's [run] table and the command line own; cells and presets may not set them
RUN_OWNED = {"dataset", "data_path", "protocol", "fold", "folds", "repetition", "seed"}
# fermodel.config's DATA_KEYS (what data_key and load_trial_data read) and SPLIT_KEYS (what
# trial_splits reads) decide the data a trial sees. A tuning study reads its dataset once, on
# the driver, from the base config, so none of them may be sampled per trial.
DATASET_KEYS = frozenset(DATA_KEYS) | frozenset(SPLIT_KEYS)
# what a tuning trial reports every epoch, so what it can be ranked, stopped and chosen by:
# validation figures, and the cost of running its architecture (fermodel.cost)
METRICS = (
    "best_val_accuracy",
    "val_accuracy",
    "val_macro_f1",
    "val_min_recall",
    "params",
    "gflops",
    "latency_ms",
    "throughput",
)
CONSTRAINT = re.compile(r"^\s*(\w+)\s*(<=|>=)\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$")


class StudyError(ValueError):
    """A study file or override that is invalid: names the file, the key and the problem."""


@dataclass(frozen=True)
class Cell:
    name: str
    label: str
    overrides: dict
    paper: dict  # dataset -> accuracy (%) reported by the paper


@dataclass(frozen=True)
class Contrast:
    """A comparison the report makes: the accuracies of the ``plus`` cells minus those of the
    ``minus`` cells, tested within its ``family`` (Holm-adjusted with the family's others)."""

    family: str
    label: str
    plus: tuple[str, ...]
    minus: tuple[str, ...]

    @property
    def weights(self) -> dict[str, int]:
        return {**{c: 1 for c in self.plus}, **{c: -1 for c in self.minus}}


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    when: dict = field(default_factory=dict)  # other parameter -> values that activate this one

    def active(self, sampled: dict) -> bool:
        return all(sampled.get(k) in values for k, values in self.when.items())


@dataclass(frozen=True)
class Constraint:
    """``metric <= bound`` or ``metric >= bound``; as Optuna takes it, a value <= 0 is met."""

    metric: str
    op: str
    bound: float
    written: str = ""  # the bound as the study file writes it

    def excess(self, value: float) -> float:
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.written or format(self.bound, 'g')}"


@dataclass(frozen=True)
class TuneSettings:
    metric: str = "best_val_accuracy"
    mode: str = "max"
    num_samples: int = 20
    grace_period: int = 1
    reduction_factor: int = 3
    # several objectives replace metric and mode: ((metric, "max" | "min"), ...)
    objectives: tuple = ()
    constraints: tuple = ()  # Constraint, ...

    @property
    def goals(self) -> list[tuple[str, str]]:
        """What the search optimises: the objectives, or the one metric and its mode."""
        return list(self.objectives) or [(self.metric, self.mode)]


def trial_identity(study: str, config: TrialConfig) -> str:
    """What decides a trial's result, as a digest: the study's name and the trial's resolved
    config without where it runs (``PLACE_KEYS``). Equal identities are the same trial, whichever
    invocation runs it; a changed config is another trial."""
    science = {k: v for k, v in config.to_dict().items() if k not in PLACE_KEYS}
    if not science["repetition"]:  # added later: a single split keeps its trials' identities
        del science["repetition"]
    text = json.dumps({"study": study, "config": science}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrialSpec:
    """One trial of a study: its place in the design, its full config and its identity."""

    cell: str
    seed: int
    fold: int
    config: TrialConfig
    identity: str = ""
    repetition: int = 0

    @property
    def key(self) -> str:
        return trial_key(self.cell, self.seed, self.fold, self.repetition)


def trial_key(cell: str, seed: int, fold: int, repetition: int = 0) -> str:
    """A grid trial's name (its MLflow run's): ``basic-seed0-fold3``, ``basic-seed0-rep1-fold3``
    in a repeated k-fold study's later repetitions."""
    rep = f"-rep{repetition}" if repetition else ""
    return f"{cell}-seed{seed}{rep}-fold{fold}"


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    path: Path
    kind: str
    dataset: str
    data_path: str
    protocol: str
    folds: int
    seeds: int
    defaults: dict
    presets: dict  # preset -> {"config": {...}, "tune": {...}, "datasets": {dataset: {...}}}
    cells: tuple[Cell, ...] = ()
    reference: str | None = None
    contrasts: tuple[Contrast, ...] = ()  # declared; ``comparisons`` falls back on reference
    space: tuple[Param, ...] = ()
    tune: TuneSettings = TuneSettings()
    seeds_given: bool = False  # seeds came from the command line: presets do not override it
    repetitions: int = 1  # of the kfold protocol's folds, each drawn anew (repeated k-fold)

    @property
    def comparisons(self) -> tuple[Contrast, ...]:
        """The declared contrasts, or every cell against the reference."""
        return self.contrasts or default_contrasts(self.cells, self.reference)

    def seeds_for(self, preset: str | None) -> int:
        """Seeds per cell: --seeds, else the preset's ``seeds``, else [run]'s."""
        if self.seeds_given or not preset:
            return self.seeds
        return self.presets.get(preset, {}).get("seeds", self.seeds)

    # ------------------------------------------------------------------ overrides

    def with_run(
        self,
        dataset: str | None = None,
        data_path: str | None = None,
        seeds: int | None = None,
        folds: int | None = None,
        protocol: str | None = None,
        repetitions: int | None = None,
    ) -> Study:
        """The study with its [run] values replaced (the command line's --dataset, --data,
        --seeds, --protocol); the result is validated like a file."""
        changed = replace(
            self,
            dataset=dataset if dataset is not None else self.dataset,
            data_path=data_path if data_path is not None else self.data_path,
            seeds=seeds if seeds is not None else self.seeds,
            folds=folds if folds is not None else self.folds,
            protocol=protocol if protocol is not None else self.protocol,
            repetitions=repetitions if repetitions is not None else self.repetitions,
            seeds_given=self.seeds_given or seeds is not None,
        )
        if changed.seeds < 1:
            raise StudyError(f"{self.path}: seeds: must be at least 1, got {changed.seeds}")
        changed._check_repetitions("repetitions")
        changed.base_config(next(iter(self.presets), None))  # raises on a bad combination
        return changed

    @property
    def resolved_protocol(self) -> str:
        if self.protocol != "auto":
            return self.protocol
        return "kfold" if self.dataset == "ckplus" else "official"

    @property
    def fold_ids(self) -> list[int]:
        return list(range(self.folds)) if self.resolved_protocol == "kfold" else [0]

    def _check_repetitions(self, key: str) -> None:
        if self.repetitions < 1:
            raise StudyError(f"{self.path}: {key}: must be at least 1, got {self.repetitions}")
        if self.repetitions > 1 and self.kind != "grid":
            raise StudyError(
                f"{self.path}: {key}: repeated k-fold is a grid study's design; "
                "a tuning study trains one split per sample"
            )

    @property
    def repetition_ids(self) -> list[int]:
        """Like the folds, repetitions count only where the protocol has folds."""
        return list(range(self.repetitions)) if self.resolved_protocol == "kfold" else [0]

    def tune_settings(self, preset: str | None) -> TuneSettings:
        changes = self.presets.get(preset, {}).get("tune", {}) if preset else {}
        return replace(self.tune, **changes)

    # ------------------------------------------------------------------ trials

    def base_config(self, preset: str | None, **changes) -> dict:
        """Trial-config keys shared by every trial: defaults, then the preset, then the run."""
        if preset is not None and preset not in self.presets:
            raise StudyError(
                f"{self.path}: preset {preset!r} is not defined; "
                f"defined: {', '.join(self.presets) or 'none'}"
            )
        chosen = self.presets[preset] if preset else {}
        values = {
            **self.defaults,
            **chosen.get("config", {}),
            **chosen.get("datasets", {}).get(self.dataset, {}),
            "dataset": self.dataset,
            "data_path": self.data_path,
            "protocol": self.resolved_protocol,
            "folds": self.folds,
            **changes,
        }
        _config(self.path, "[run]", values)
        return values

    def trials(self, preset: str | None, **changes) -> list[TrialSpec]:
        """Every trial of a grid study: cells x seeds x repetitions x folds, in that order."""
        if self.kind != "grid":
            raise StudyError(f"{self.path}: kind: a {self.kind} study has no fixed trial list")
        base = self.base_config(preset, **changes)
        specs = []
        for cell in self.cells:
            for seed in range(self.seeds_for(preset)):
                for rep, fold in itertools.product(self.repetition_ids, self.fold_ids):
                    values = {
                        **base,
                        **cell.overrides,
                        "seed": seed,
                        "fold": fold,
                        "repetition": rep,
                    }
                    config = _config(self.path, f"cells.{cell.name}", values)
                    identity = trial_identity(self.name, config)
                    specs.append(TrialSpec(cell.name, seed, fold, config, identity, rep))
        return specs

    def sample(self, trial) -> dict:
        """Optuna define-by-run: suggest every active parameter of the space, in file order;
        a parameter whose ``when`` does not hold is not sampled at all."""
        sampled: dict = {}
        for p in self.space:
            if not p.active(sampled):
                continue
            if p.type == "categorical":
                sampled[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.type == "int":
                sampled[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high))
            else:
                sampled[p.name] = trial.suggest_float(
                    p.name, p.low, p.high, log=p.type == "loguniform"
                )
        return sampled


def _config(path: Path, where: str, values: dict) -> TrialConfig:
    try:
        return TrialConfig.from_dict(values)
    except ConfigError as err:
        raise StudyError(f"{path}: {where}: {err}") from None


# ---------------------------------------------------------------------- loading


def list_studies() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.toml"))


def load_study(name_or_path) -> Study:
    """A shipped study by name (``table3``, ``table4``, ``table5``, ``hpo``) or a file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (text.endswith(".toml") or path.is_file()):
        path = STUDY_DIR / f"{text}.toml"
        if not path.is_file():
            raise StudyError(
                f"unknown study {text!r}; shipped: {', '.join(list_studies())} "
                f"(or give the path of a .toml file)"
            )
    if not path.is_file():
        raise StudyError(f"{path}: no such study file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"{path}: not valid TOML ({err})") from None
    return _parse(path.resolve(), raw)


def _parse(path: Path, raw: dict) -> Study:
    def fail(key: str, problem: str) -> StudyError:
        return StudyError(f"{path}: {key}: {problem}")

    allowed = {
        "name",
        "description",
        "kind",
        "reference",
        "contrasts",
        "run",
        "defaults",
        "cells",
        "tune",
        "space",
        "presets",
    }
    for key in raw:
        if key not in allowed:
            raise fail(key, f"unknown key; allowed: {', '.join(sorted(allowed))}")
    name = _typed(raw, "name", str, fail, required=True)
    kind = _typed(raw, "kind", str, fail, required=True)
    if kind not in KINDS:
        raise fail("kind", f"{kind!r} is not one of {', '.join(KINDS)}")

    run = _table(raw, "run", fail)
    for key in run:
        if key not in ("dataset", "data_path", "protocol", "folds", "repetitions", "seeds"):
            raise fail(
                f"run.{key}",
                "unknown key; allowed: dataset, data_path, protocol, folds, repetitions, seeds",
            )
    protocol = _typed(run, "protocol", str, fail, "run.", default="auto")
    if protocol not in ("auto", "official", "kfold", "paper"):
        raise fail("run.protocol", f"{protocol!r} is not one of auto, official, kfold, paper")
    seeds = _typed(run, "seeds", int, fail, "run.", default=1)
    folds = _typed(run, "folds", int, fail, "run.", default=10)
    if seeds < 1 or folds < 3:
        raise fail("run.seeds" if seeds < 1 else "run.folds", "seeds >= 1 and folds >= 3")

    defaults = _trial_keys(_table(raw, "defaults", fail), "defaults", fail)
    presets = {}
    for preset, table in _table(raw, "presets", fail).items():
        if not isinstance(table, dict):
            raise fail(f"presets.{preset}", "must be a table of config keys")
        if "tune" in table and kind != "tune":
            raise fail(f"presets.{preset}.tune", "only a tune study has this")
        tune_changes = table.get("tune", {})
        # [presets.NAME.<dataset>]: keys applied only when the study runs on that dataset
        per_dataset = {k: v for k, v in table.items() if k in DATASETS and isinstance(v, dict)}
        keys = {
            k: v for k, v in table.items() if k not in ("tune", "seeds") and k not in per_dataset
        }
        if "seeds" in table:
            value = _typed(table, "seeds", int, fail, f"presets.{preset}.")
            if value < 1:
                raise fail(f"presets.{preset}.seeds", f"must be at least 1, got {value}")
        presets[preset] = {
            "config": _trial_keys(keys, f"presets.{preset}", fail),
            "tune": _tune_keys(tune_changes, f"presets.{preset}.tune", fail),
            "datasets": {
                dataset: _trial_keys(values, f"presets.{preset}.{dataset}", fail)
                for dataset, values in per_dataset.items()
            },
            **({"seeds": table["seeds"]} if "seeds" in table else {}),
        }
        for dataset, values in presets[preset]["datasets"].items():
            merged = {
                **defaults,
                **presets[preset]["config"],
                **values,
                "dataset": dataset,
                "data_path": "" if dataset == "synthetic" else "/",
            }
            _config(path, f"presets.{preset}.{dataset}", merged)

    study = Study(
        name=name,
        description=_typed(raw, "description", str, fail, default=""),
        path=path,
        kind=kind,
        dataset=_typed(run, "dataset", str, fail, "run.", default="synthetic"),
        data_path=_typed(run, "data_path", str, fail, "run.", default=""),
        protocol=protocol,
        folds=folds,
        seeds=seeds,
        defaults=defaults,
        presets=presets,
        repetitions=_typed(run, "repetitions", int, fail, "run.", default=1),
    )
    study._check_repetitions("run.repetitions")
    if kind == "grid":
        study = _grid(study, raw, fail)
    else:
        study = _tune(study, raw, fail)
    for preset in [None, *presets]:  # every combination must make valid trial configs
        if kind == "grid":
            study.trials(preset)
        else:
            _check_rungs(study, preset, raw, fail)
    return study


def asha_rungs(epochs: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA may stop a trial. Ray has no public API that lists them, so
    this repeats ``ray.tune.schedulers.async_hyperband``'s formula (rungs at grace * rf^k up
    to max_t, here ``epochs - 1``); tests/test_orchestrate.py checks it against Ray's bracket."""
    max_t = epochs - 1
    if grace_period > max_t:
        return []
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(count)]


def _check_rungs(study: Study, preset: str | None, raw: dict, fail) -> None:
    """ASHA's rungs lie at grace_period * reduction_factor**k epochs; a first rung at or past
    the last epoch stops nothing, so the study would pay for ASHA and get no early stopping."""
    epochs = _config(study.path, "[run]", study.base_config(preset)).epochs
    grace = study.tune_settings(preset).grace_period
    if grace < epochs:
        return
    preset_table = raw.get("presets", {}).get(preset, {}) if preset else {}
    if "grace_period" in preset_table.get("tune", {}):
        key = f"presets.{preset}.tune.grace_period"
    else:
        key = "tune.grace_period"
    if "epochs" in preset_table:
        source = f" in preset {preset}"
    elif "epochs" in study.defaults:
        source = " in [defaults]"
    else:
        source = ", TrialConfig's default"
    raise fail(
        key, f"{grace} leaves no ASHA rung before the last epoch (epochs = {epochs}{source})"
    )


def _grid(study: Study, raw: dict, fail) -> Study:
    if "space" in raw or "tune" in raw:
        raise fail("space" if "space" in raw else "tune", "only a tune study has this")
    cells_raw = raw.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        raise fail("cells", "a grid study needs a non-empty [[cells]] list")
    cells, names = [], set()
    for i, entry in enumerate(cells_raw):
        where = f"cells[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, "must be a table")
        name = _typed(entry, "name", str, fail, f"{where}.", required=True)
        if name in names:
            raise fail(f"{where}.name", f"{name!r} is used twice")
        names.add(name)
        paper = entry.get("paper", {})
        if not isinstance(paper, dict):
            raise fail(f"{where}.paper", "must map datasets to accuracies in percent")
        for dataset, accuracy in paper.items():
            if dataset not in DATASETS:
                raise fail(
                    f"{where}.paper.{dataset}", f"not a dataset; known: {', '.join(DATASETS)}"
                )
            if not _number(accuracy) or not 0 <= accuracy <= 100:
                problem = f"must be an accuracy in percent (0 to 100), got {accuracy!r}"
                raise fail(f"{where}.paper.{dataset}", problem)
        keys = {k: v for k, v in entry.items() if k not in ("name", "label", "paper")}
        cells.append(
            Cell(
                name=name,
                label=_typed(entry, "label", str, fail, f"{where}.", default=name),
                overrides=_trial_keys(keys, where, fail),
                paper={k: float(v) for k, v in paper.items()},
            )
        )
    reference = raw.get("reference", cells[0].name)
    if reference not in names:
        raise fail("reference", f"{reference!r} is not a cell; cells: {', '.join(names)}")
    contrasts = parse_contrasts(raw.get("contrasts", []), tuple(cells), fail)
    return replace(study, cells=tuple(cells), reference=reference, contrasts=contrasts)


def default_contrasts(cells: tuple[Cell, ...], reference: str | None) -> tuple[Contrast, ...]:
    """Every cell against the reference, one family."""
    if reference is None:
        return ()
    label = next((c.label for c in cells if c.name == reference), reference)
    return tuple(
        Contrast(f"each cell vs {label}", f"{c.label} vs {label}", (c.name,), (reference,))
        for c in cells
        if c.name != reference
    )


def study_contrasts(raw: dict, source: str = "study.toml") -> tuple[Contrast, ...]:
    """The comparisons of a grid study from its TOML as a dict (the report reads the study file
    logged on the parent run): the declared contrasts, or every cell against the reference."""

    def fail(key: str, problem: str) -> StudyError:
        return StudyError(f"{source}: {key}: {problem}")

    cells = tuple(Cell(c["name"], c.get("label", c["name"]), {}, {}) for c in raw.get("cells", []))
    declared = parse_contrasts(raw.get("contrasts", []), cells, fail)
    return declared or default_contrasts(
        cells, raw.get("reference", cells[0].name if cells else None)
    )


def parse_contrasts(entries, cells: tuple[Cell, ...], fail) -> tuple[Contrast, ...]:
    """A grid study's ``[[contrasts]]``: each a family, a label (default: "A vs B", or
    "(A + B) - (C + D)"), and the cells it adds and subtracts, as many of each, none twice."""
    if not isinstance(entries, list):
        raise fail("contrasts", "must be a list of tables ([[contrasts]])")
    labels = {c.name: c.label for c in cells}
    out: list[Contrast] = []
    for i, entry in enumerate(entries):
        where = f"contrasts[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, "must be a table")
        for key in entry:
            if key not in ("family", "label", "plus", "minus"):
                raise fail(f"{where}.{key}", "unknown key; allowed: family, label, plus, minus")
        sides = {}
        for side in ("plus", "minus"):
            value = entry.get(side)
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) for v in value)
            ):
                raise fail(f"{where}.{side}", "must be a non-empty list of cell names")
            unknown = [v for v in value if v not in labels]
            if unknown:
                raise fail(
                    f"{where}.{side}", f"{unknown[0]!r} is not a cell; cells: {', '.join(labels)}"
                )
            sides[side] = tuple(value)
        plus, minus = sides["plus"], sides["minus"]
        if len(plus) != len(minus):
            raise fail(
                where,
                f"plus and minus need as many cells each (the weights sum to 0), "
                f"got {len(plus)} and {len(minus)}",
            )
        twice = sorted(c for c in set(plus + minus) if (plus + minus).count(c) > 1)
        if twice:
            raise fail(where, f"cell {twice[0]!r} is listed twice")
        if len(plus) == 1:
            default = f"{labels[plus[0]]} vs {labels[minus[0]]}"
        else:
            default = (
                f"({' + '.join(labels[c] for c in plus)}) - "
                f"({' + '.join(labels[c] for c in minus)})"
            )
        family = _typed(entry, "family", str, fail, f"{where}.", default="comparisons")
        label = _typed(entry, "label", str, fail, f"{where}.", default=default)
        if any(c.family == family and c.label == label for c in out):
            raise fail(f"{where}.label", f"{label!r} is used twice in family {family!r}")
        out.append(Contrast(family, label, plus, minus))
    return tuple(out)


def _tune(study: Study, raw: dict, fail) -> Study:
    for key in ("cells", "reference", "contrasts"):
        if key in raw:
            raise fail(key, "only a grid study has this")
    settings = TuneSettings(**_tune_keys(_table(raw, "tune", fail), "tune", fail))
    space_raw = raw.get("space")
    if not isinstance(space_raw, list) or not space_raw:
        raise fail("space", "a tune study needs a non-empty [[space]] list")
    params: list[Param] = []
    for i, entry in enumerate(space_raw):
        where = f"space[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, "must be a table")
        for key in entry:
            if key not in ("name", "type", "choices", "low", "high", "when"):
                raise fail(f"{where}.{key}", "unknown key")
        name = _typed(entry, "name", str, fail, f"{where}.", required=True)
        if name not in TRIAL_KEYS or name in RUN_OWNED:
            raise fail(f"{where}.name", f"{name!r} is not a trial-config key that can be tuned")
        if name in DATASET_KEYS:
            what = "the dataset every trial reads; tuning studies load it once"
            if name not in DATA_KEYS:
                what = "the splits every trial reads; tuning studies fix them once"
            raise fail(
                f"{where}.name", f"{name!r} changes {what} (set it in [defaults] or a preset)"
            )
        if any(p.name == name for p in params):
            raise fail(f"{where}.name", f"{name!r} is sampled twice")
        kind = _typed(entry, "type", str, fail, f"{where}.", required=True)
        if kind not in PARAM_TYPES:
            raise fail(f"{where}.type", f"{kind!r} is not one of {', '.join(PARAM_TYPES)}")
        when = entry.get("when", {})
        if not isinstance(when, dict):
            raise fail(f"{where}.when", "must map earlier parameters to lists of values")
        for other, values in when.items():
            earlier = next((p for p in params if p.name == other), None)
            if earlier is None:
                raise fail(f"{where}.when.{other}", "names no earlier parameter of the space")
            # an empty list would never sample the parameter
            listed = isinstance(values, list) and values
            if not listed or not all(v in earlier.choices for v in values):
                raise fail(f"{where}.when.{other}", f"must be a list of {other}'s choices")
        takes = FIELD_TYPES[name]
        if kind == "categorical":
            param = Param(name, kind, choices=_choices(study, entry, name, where, fail), when=when)
        else:
            if takes not in (int, float):
                raise fail(
                    f"{where}.type",
                    f"{kind!r} samples numbers; {name!r} takes "
                    f"{TYPE_NAMES[takes]} (use categorical)",
                )
            if takes is int and kind != "int":
                raise fail(
                    f"{where}.type",
                    f"{kind!r} samples fractions; {name!r} takes integers (use int)",
                )
            low, high = entry.get("low"), entry.get("high")
            for key, value in (("low", low), ("high", high)):
                if kind == "int" and not _of_type(value, int):
                    raise fail(
                        f"{where}.{key}", f"an int parameter needs integer bounds, got {value!r}"
                    )
                if _number(value) and not math.isfinite(value):
                    raise fail(f"{where}.{key}", f"must be finite, got {value!r}")
            if (
                not (_number(low) and _number(high))
                or not low < high
                or (kind == "loguniform" and low <= 0)
            ):
                raise fail(
                    f"{where}.low",
                    f"needs numbers low < high (> 0 for loguniform), got {low!r}, {high!r}",
                )
            for v in (low, high):
                _config(study.path, f"{where}", {**study.defaults, name: v})
            if kind != "int":
                low, high = float(low), float(high)
            param = Param(name, kind, low=low, high=high, when=when)
        params.append(param)
    return replace(study, space=tuple(params), tune=settings)


def _choices(study: Study, entry: dict, name: str, where: str, fail) -> tuple:
    """A categorical parameter's choices: distinct values of the TOML type the key takes
    (``from_dict`` also parses strings, as MLflow returns params, but Optuna would then sample
    ``"32"`` and ``32`` as different values), each a valid trial config."""
    choices = entry.get("choices")
    if not isinstance(choices, list) or not choices:
        raise fail(f"{where}.choices", "a categorical parameter needs a list of choices")
    takes = FIELD_TYPES[name]
    seen = []
    for choice in choices:
        if not _of_type(choice, takes):
            raise fail(f"{where}.choices", f"{name!r} takes {TYPE_NAMES[takes]}, got {choice!r}")
        _config(study.path, f"{where}.choices", {**study.defaults, name: choice})
        value = float(choice) if takes is float else choice
        if value in seen:
            raise fail(f"{where}.choices", f"{choice!r} is listed twice")
        seen.append(value)
    return tuple(choices)


def _tune_keys(table, where: str, fail) -> dict:
    if not isinstance(table, dict):
        raise fail(where, "must be a table")
    known = TuneSettings.__dataclass_fields__
    out = {}
    for key, value in table.items():
        if key not in known:
            raise fail(f"{where}.{key}", f"unknown key; allowed: {', '.join(known)}")
        if key == "objectives":
            out[key] = _objectives(value, f"{where}.{key}", fail)
            continue
        if key == "constraints":
            out[key] = _constraints(value, f"{where}.{key}", fail)
            continue
        kind = type(getattr(TuneSettings(), key))
        if not isinstance(value, kind) or isinstance(value, bool):
            raise fail(f"{where}.{key}", f"expected {kind.__name__}, got {value!r}")
        if kind is int and value < 1:
            raise fail(f"{where}.{key}", f"must be at least 1, got {value}")
        out[key] = value
    if out.get("mode", "max") not in ("max", "min"):
        raise fail(f"{where}.mode", "must be max or min")
    if out.get("metric", METRICS[0]) not in METRICS:
        raise fail(f"{where}.metric", f"must be one of {', '.join(METRICS)}, got {out['metric']!r}")
    if "objectives" in out and ({"metric", "mode"} & set(out)):
        raise fail(f"{where}.objectives", "replaces metric and mode: give one or the other")
    factor = out.get("reduction_factor", 2)
    if factor < 2:  # ASHAScheduler asserts reduction_factor > 1
        raise fail(
            f"{where}.reduction_factor",
            f"must be at least 2 (ASHA keeps 1 in "
            f"reduction_factor trials at each rung), got {factor}",
        )
    return out


def _metric(name, where: str, fail) -> str:
    if name not in METRICS:
        raise fail(where, f"{name!r} is not a metric trials report; one of {', '.join(METRICS)}")
    return name


def _objectives(value, where: str, fail) -> tuple:
    """``{ best_val_accuracy = "max", latency_ms = "min" }``: metrics and their directions, in
    order (the first is what ASHA and the progress line read with one objective)."""
    if not isinstance(value, dict) or not value:
        raise fail(where, 'must map metrics to "max" or "min", as { best_val_accuracy = "max" }')
    for metric, mode in value.items():
        _metric(metric, f"{where}.{metric}", fail)
        if mode not in ("max", "min"):
            raise fail(f"{where}.{metric}", f'mode must be "max" or "min", got {mode!r}')
    return tuple(value.items())


def _constraints(value, where: str, fail) -> tuple:
    """``["latency_ms <= 5", ...]``: a trial that breaks one is infeasible."""
    if not isinstance(value, list):
        raise fail(where, 'must be a list such as ["latency_ms <= 5"]')
    out = []
    for i, text in enumerate(value):
        match = CONSTRAINT.match(text) if isinstance(text, str) else None
        if match is None:
            raise fail(
                f"{where}[{i}]", f'must read "METRIC <= NUMBER" or "METRIC >= NUMBER", got {text!r}'
            )
        metric, op, bound = match.groups()
        out.append(Constraint(_metric(metric, f"{where}[{i}]", fail), op, float(bound), bound))
    return tuple(out)


def _trial_keys(table: dict, where: str, fail) -> dict:
    for key, value in table.items():
        if key not in TRIAL_KEYS:
            raise fail(f"{where}.{key}", "not a trial-config key")
        if key in RUN_OWNED:
            raise fail(f"{where}.{key}", "set by the study's [run] table or the command line")
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(f"{where}.{key}", "must be finite")
    return dict(table)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _of_type(value, kind) -> bool:
    """Whether a TOML value is of a trial-config key's type (an integer is a float too)."""
    if kind is float:
        return _number(value) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _table(raw: dict, key: str, fail) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise fail(key, "must be a table")
    return value


def _typed(raw: dict, key: str, kind, fail, prefix: str = "", required=False, default=None):
    if key not in raw:
        if required:
            raise fail(f"{prefix}{key}", "missing")
        return default
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise fail(f"{prefix}{key}", f"expected {kind.__name__}, got {value!r}")
    return value
