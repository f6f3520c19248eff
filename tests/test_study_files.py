"""The study loader refuses, with file, key and reason, every value Ray Tune or Optuna would
refuse later (or silently ignore), and the shipped studies load with every preset."""

import re
import textwrap
from dataclasses import fields

import optuna
import pytest

from fermodel import engine
from fermodel.config import ConfigError, TrialConfig
from fermodel.data import DATASETS
from search_spaces import StudyError, TuneSettings, list_studies, load_study
from search_spaces.study import DATA_KEYS, DATASET_KEYS, RUN_OWNED

TUNE = """
name = "t"
kind = "tune"
[run]
dataset = "synthetic"
[tune]
grace_period = 1
reduction_factor = 2
[[space]]
name = "loss"
type = "categorical"
choices = ["ce", "island"]
[[space]]
name = "lr"
type = "loguniform"
low = 0.0001
high = 0.01
[presets.cpu]
epochs = 4
"""

GRID = """
name = "g"
kind = "grid"
[run]
dataset = "synthetic"
[[cells]]
name = "basic"
attention = "none"
paper = { ckplus = 94.8 }
[presets.cpu]
epochs = 2
"""

LABELS_REASON = (
    "'labels' changes the dataset every trial reads; tuning studies load it once "
    "(set it in [defaults] or a preset)"
)


def space(entry: str) -> str:
    """TUNE with one more [[space]] parameter (space[2]) before the presets."""
    return TUNE.replace("[presets.cpu]", f"[[space]]\n{textwrap.dedent(entry)}\n[presets.cpu]")


def write(tmp_path, body: str):
    path = tmp_path / "study.toml"
    path.write_text(textwrap.dedent(body))
    return path


def refused(tmp_path, body: str) -> tuple:
    path = write(tmp_path, body)
    with pytest.raises(StudyError) as err:
        load_study(path)
    return str(err.value), path.resolve()


BAD = [
    # [tune] and [presets.X.tune]: what ASHAScheduler asserts or Tune refuses
    pytest.param(
        TUNE.replace("reduction_factor = 2", "reduction_factor = 1"),
        "tune.reduction_factor",
        "must be at least 2 (ASHA keeps 1 in reduction_factor trials at each rung), got 1",
        id="reduction-factor-1",
    ),
    pytest.param(
        TUNE.replace("reduction_factor = 2", "reduction_factor = 2.5"),
        "tune.reduction_factor",
        "expected int, got 2.5",
        id="reduction-factor-fraction",
    ),
    pytest.param(
        TUNE + "[presets.cpu.tune]\nreduction_factor = 1\n",
        "presets.cpu.tune.reduction_factor",
        "must be at least 2 (ASHA keeps 1 in reduction_factor trials at each rung), got 1",
        id="preset-reduction-factor-1",
    ),
    pytest.param(
        TUNE.replace("grace_period = 1", "grace_period = 0"),
        "tune.grace_period",
        "must be at least 1, got 0",
        id="grace-0",
    ),
    pytest.param(
        TUNE + "[presets.cpu.tune]\nnum_samples = 0\n",
        "presets.cpu.tune.num_samples",
        "must be at least 1, got 0",
        id="num-samples-0",
    ),
    pytest.param(
        TUNE + '[presets.cpu.tune]\nmetric = "test_accuracy"\n',
        "presets.cpu.tune.metric",
        "must be one of best_val_accuracy, val_accuracy, val_macro_f1, val_min_recall, params, "
        "gflops, latency_ms, throughput, got 'test_accuracy'",
        id="preset-metric",
    ),
    pytest.param(
        TUNE.replace(
            "[tune]", '[tune]\nobjectives = { best_val_accuracy = "max", test_accuracy = "max" }'
        ),
        "tune.objectives.test_accuracy",
        "'test_accuracy' is not a metric trials report; one of best_val_accuracy, val_accuracy, "
        "val_macro_f1, val_min_recall, params, gflops, latency_ms, throughput",
        id="objective-unknown-metric",
    ),
    pytest.param(
        TUNE.replace(
            "[tune]", '[tune]\nobjectives = { best_val_accuracy = "max", latency_ms = "lowest" }'
        ),
        "tune.objectives.latency_ms",
        'mode must be "max" or "min", got \'lowest\'',
        id="objective-mode",
    ),
    pytest.param(
        TUNE.replace(
            "[tune]", '[tune]\nmetric = "val_accuracy"\nobjectives = { latency_ms = "min" }'
        ),
        "tune.objectives",
        "replaces metric and mode: give one or the other",
        id="objectives-beside-metric",
    ),
    pytest.param(
        TUNE.replace("[tune]", '[tune]\nconstraints = ["latency <= 5"]'),
        "tune.constraints[0]",
        "'latency' is not a metric trials report; one of best_val_accuracy, val_accuracy, "
        "val_macro_f1, val_min_recall, params, gflops, latency_ms, throughput",
        id="constraint-unknown-metric",
    ),
    pytest.param(
        TUNE.replace("[tune]", '[tune]\nconstraints = ["latency_ms < 5"]'),
        "tune.constraints[0]",
        'must read "METRIC <= NUMBER" or "METRIC >= NUMBER", got \'latency_ms < 5\'',
        id="constraint-form",
    ),
    pytest.param(
        TUNE + '[presets.cpu.tune]\nmode = "maximum"\n',
        "presets.cpu.tune.mode",
        "must be max or min",
        id="preset-mode",
    ),
    pytest.param(
        GRID + "[presets.cpu.tune]\nnum_samples = 3\n",
        "presets.cpu.tune",
        "only a tune study has this",
        id="grid-preset-tune",
    ),
    # rungs: the first at the grace period must come before the last epoch of every preset
    pytest.param(
        TUNE.replace("epochs = 4", "epochs = 10") + "[presets.cpu.tune]\ngrace_period = 10\n",
        "presets.cpu.tune.grace_period",
        "10 leaves no ASHA rung before the last epoch (epochs = 10 in preset cpu)",
        id="preset-grace-at-last-epoch",
    ),
    pytest.param(
        TUNE.replace("grace_period = 1", "grace_period = 4"),
        "tune.grace_period",
        "4 leaves no ASHA rung before the last epoch (epochs = 4 in preset cpu)",
        id="grace-at-preset-last-epoch",
    ),
    pytest.param(
        TUNE.replace("grace_period = 1", "grace_period = 6"),
        "tune.grace_period",
        "6 leaves no ASHA rung before the last epoch (epochs = 4 in preset cpu)",
        id="grace-past-preset-last-epoch",
    ),
    pytest.param(
        TUNE.replace("grace_period = 1", "grace_period = 5").replace(
            "[tune]", "[defaults]\nepochs = 3\n[tune]"
        ),
        "tune.grace_period",
        "5 leaves no ASHA rung before the last epoch (epochs = 3 in [defaults])",
        id="grace-past-defaults-epochs",
    ),
    pytest.param(
        TUNE.replace("grace_period = 1", "grace_period = 200"),
        "tune.grace_period",
        "200 leaves no ASHA rung before the last epoch (epochs = 200, TrialConfig's default)",
        id="grace-at-default-epochs",
    ),
    pytest.param(
        TUNE + "[presets.cpu.tune]\ngrace_period = 2\n[presets.short]\nepochs = 2\n"
        "[presets.short.tune]\ngrace_period = 2\n",
        "presets.short.tune.grace_period",
        "2 leaves no ASHA rung before the last epoch (epochs = 2 in preset short)",
        id="second-preset",
    ),
    # paper: datasets the project knows, accuracies in percent
    pytest.param(
        GRID.replace("ckplus = 94.8", "affectnet = 60.0"),
        "cells[0].paper.affectnet",
        f"not a dataset; known: {', '.join(DATASETS)}",
        id="paper-unknown-dataset",
    ),
    pytest.param(
        GRID.replace("ckplus = 94.8", "ckplus = 94.8, CKPlus = 90.0"),
        "cells[0].paper.CKPlus",
        f"not a dataset; known: {', '.join(DATASETS)}",
        id="paper-misspelt-dataset",
    ),
    pytest.param(
        GRID.replace("ckplus = 94.8", "ckplus = 120.0"),
        "cells[0].paper.ckplus",
        "must be an accuracy in percent (0 to 100), got 120.0",
        id="paper-over-100",
    ),
    pytest.param(
        GRID.replace("ckplus = 94.8", "ckplus = true"),
        "cells[0].paper.ckplus",
        "must be an accuracy in percent (0 to 100), got True",
        id="paper-bool",
    ),
    # [[space]]: what suggest_int / suggest_float / suggest_categorical would refuse or mangle
    pytest.param(
        space('name = "batch_size"\ntype = "int"\nlow = 8.5\nhigh = 64'),
        "space[2].low",
        "an int parameter needs integer bounds, got 8.5",
        id="int-fractional-low",
    ),
    pytest.param(
        space('name = "batch_size"\ntype = "int"\nlow = 8\nhigh = 64.0'),
        "space[2].high",
        "an int parameter needs integer bounds, got 64.0",
        id="int-float-high",
    ),
    pytest.param(
        space('name = "batch_size"\ntype = "int"\nlow = 8'),
        "space[2].high",
        "an int parameter needs integer bounds, got None",
        id="int-missing-high",
    ),
    pytest.param(
        space('name = "batch_size"\ntype = "int"\nlow = 64\nhigh = 8'),
        "space[2].low",
        "needs numbers low < high (> 0 for loguniform), got 64, 8",
        id="int-reversed",
    ),
    pytest.param(
        TUNE.replace("high = 0.01", "high = inf"),
        "space[1].high",
        "must be finite, got inf",
        id="loguniform-inf",
    ),
    pytest.param(
        space('name = "weight_decay"\ntype = "uniform"\nlow = nan\nhigh = 0.1'),
        "space[2].low",
        "must be finite, got nan",
        id="uniform-nan",
    ),
    pytest.param(
        TUNE.replace("low = 0.0001", "low = 0.0"),
        "space[1].low",
        "needs numbers low < high (> 0 for loguniform), got 0.0, 0.01",
        id="loguniform-zero",
    ),
    pytest.param(
        space('name = "batch_size"\ntype = "uniform"\nlow = 16\nhigh = 64'),
        "space[2].type",
        "'uniform' samples fractions; 'batch_size' takes integers (use int)",
        id="uniform-on-int-key",
    ),
    pytest.param(
        space('name = "attention"\ntype = "loguniform"\nlow = 1\nhigh = 2'),
        "space[2].type",
        "'loguniform' samples numbers; 'attention' takes strings (use categorical)",
        id="loguniform-on-str-key",
    ),
    pytest.param(
        space('name = "augment"\ntype = "int"\nlow = 0\nhigh = 1'),
        "space[2].type",
        "'int' samples numbers; 'augment' takes true or false (use categorical)",
        id="int-on-bool-key",
    ),
    pytest.param(
        TUNE.replace('choices = ["ce", "island"]', 'choices = ["ce", "island", "ce"]'),
        "space[0].choices",
        "'ce' is listed twice",
        id="categorical-duplicate",
    ),
    pytest.param(
        space('name = "lam1"\ntype = "categorical"\nchoices = [1, 10, 1.0]'),
        "space[2].choices",
        "1.0 is listed twice",
        id="categorical-duplicate-number",
    ),
    pytest.param(
        space('name = "batch_size"\ntype = "categorical"\nchoices = ["32", "64"]'),
        "space[2].choices",
        "'batch_size' takes integers, got '32'",
        id="categorical-string-for-int",
    ),
    pytest.param(
        space('name = "batch_size"\ntype = "categorical"\nchoices = [16, 32.0]'),
        "space[2].choices",
        "'batch_size' takes integers, got 32.0",
        id="categorical-float-for-int",
    ),
    pytest.param(
        space('name = "lam"\ntype = "categorical"\nchoices = [0.01, "0.1"]'),
        "space[2].choices",
        "'lam' takes finite numbers, got '0.1'",
        id="categorical-string-for-float",
    ),
    pytest.param(
        space('name = "augment"\ntype = "categorical"\nchoices = [true, 0]'),
        "space[2].choices",
        "'augment' takes true or false, got 0",
        id="categorical-int-for-bool",
    ),
    pytest.param(
        space('name = "attention"\ntype = "categorical"\nchoices = ["eca", 3]'),
        "space[2].choices",
        "'attention' takes strings, got 3",
        id="categorical-int-for-str",
    ),
    pytest.param(
        space('name = "attention"\ntype = "categorical"\nchoices = ["eca", ["se"]]'),
        "space[2].choices",
        "'attention' takes strings, got ['se']",
        id="categorical-list",
    ),
    pytest.param(
        TUNE.replace("high = 0.01", "high = 0.01\nwhen = { loss = [] }"),
        "space[1].when.loss",
        "must be a list of loss's choices",
        id="when-empty",
    ),
    # tuned keys that change the data: a tuning study loads its dataset once
    pytest.param(
        TUNE.replace('name = "lr"', 'name = "labels"')
        .replace('type = "loguniform"', 'type = "categorical"\nchoices = ["fer2013", "ferplus"]')
        .replace("low = 0.0001\nhigh = 0.01\n", ""),
        "space[1].name",
        LABELS_REASON,
        id="tuned-labels",
    ),
    pytest.param(
        space('name = "balance"\ntype = "categorical"\nchoices = ["", "minority"]'),
        "space[2].name",
        "'balance' changes the splits every trial reads; tuning studies fix them once "
        "(set it in [defaults] or a preset)",
        id="tuned-balance",
    ),
    pytest.param(
        space('name = "fold"\ntype = "int"\nlow = 0\nhigh = 3'),
        "space[2].name",
        "'fold' is not a trial-config key that can be tuned",
        id="tuned-fold",
    ),
]


@pytest.mark.parametrize(("body", "key", "reason"), BAD)
def test_a_bad_study_file_is_refused_naming_file_key_and_reason(tmp_path, body, key, reason):
    message, path = refused(tmp_path, body)
    assert message == f"{path}: {key}: {reason}"


@pytest.mark.parametrize("key", sorted(DATASET_KEYS - RUN_OWNED))
def test_every_key_that_changes_the_data_is_refused_as_a_tuned_parameter(tmp_path, key):
    message, path = refused(tmp_path, space(f'name = "{key}"\ntype = "categorical"\nchoices = [1]'))
    what = (
        "the dataset every trial reads; tuning studies load it once"
        if key in DATA_KEYS
        else "the splits every trial reads; tuning studies fix them once"
    )
    assert message == (
        f"{path}: space[2].name: {key!r} changes {what} (set it in [defaults] or a preset)"
    )


def test_the_data_keys_named_in_the_issue_are_all_guarded():
    named = {
        "labels",
        "clean",
        "drop_leaked",
        "ck_frames",
        "ck_k",
        "split_seed",
        "synthetic_subjects",
        "synthetic_images_per_class",
        "balance",
        "protocol",
        "fold",
        "folds",
        "dataset",
        "data_path",
    }
    assert named <= DATASET_KEYS


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_known_dataset_is_a_paper_key(tmp_path, dataset):
    study = load_study(write(tmp_path, GRID.replace("ckplus = 94.8", f"{dataset} = 50")))
    assert study.cells[0].paper == {dataset: 50.0}


def test_a_valid_tuning_study_with_fractional_and_integer_ranges_loads_and_samples(tmp_path):
    body = space('name = "batch_size"\ntype = "int"\nlow = 16\nhigh = 64') + textwrap.dedent("""
        [[space]]
        name = "lam"
        type = "loguniform"
        low = 0.001
        high = 0.1
        when = { loss = ["island"] }
        [[space]]
        name = "weight_decay"
        type = "uniform"
        low = 0
        high = 0.001
        [[space]]
        name = "lam1"
        type = "categorical"
        choices = [1, 10.5]
        [[space]]
        name = "plateau_patience"
        type = "int"
        low = 1
        high = 3
        [presets.cpu.tune]
        grace_period = 3
        """)
    study = load_study(write(tmp_path, body))
    params = {p.name: p for p in study.space}
    assert (params["batch_size"].low, params["batch_size"].high) == (16, 64)
    assert isinstance(params["batch_size"].low, int)
    assert (params["lam"].low, params["lam"].high) == (0.001, 0.1)
    assert params["weight_decay"].low == 0.0 and isinstance(params["weight_decay"].low, float)
    assert study.tune_settings("cpu") == TuneSettings(grace_period=3, reduction_factor=2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.RandomSampler(seed=0)
    search = optuna.create_study(sampler=sampler)
    base = study.base_config("cpu")
    for _ in range(20):
        sampled = study.sample(search.ask())
        assert type(sampled["batch_size"]) is int and 16 <= sampled["batch_size"] <= 64
        assert ("lam" in sampled) == (sampled["loss"] == "island")
        config = TrialConfig.from_dict({**base, **sampled})
        assert config.batch_size == sampled["batch_size"] and config.epochs == 4


def test_the_shipped_studies_are_the_papers_tables_and_two_tuning_studies():
    assert list_studies() == ["hpo", "hpo_pareto", "table3", "table4", "table5"]
    goals = load_study("hpo_pareto").tune_settings("cpu")
    assert goals.goals == [("best_val_accuracy", "max"), ("latency_ms", "min")]
    assert [str(c) for c in goals.constraints] == ["latency_ms <= 25"]


@pytest.mark.parametrize("name", list_studies())
def test_a_shipped_study_loads_with_every_preset(name):
    study = load_study(name)
    assert study.presets, "the shipped studies all have presets"
    for preset in [None, *study.presets]:
        if study.kind == "grid":
            assert len(study.trials(preset)) == len(study.cells) * study.seeds_for(preset)
            assert all(set(cell.paper) <= set(DATASETS) for cell in study.cells)
            # the paper presets run three seeds (the runs question needs more than one)
            assert study.seeds_for(preset) == (3 if preset == "paper" else 1)
            assert study.with_run(seeds=2).seeds_for(preset) == 2  # --seeds overrides
            assert all(c.family and len(c.plus) == len(c.minus) for c in study.comparisons)
        else:
            settings = study.tune_settings(preset)
            epochs = TrialConfig.from_dict(study.base_config(preset)).epochs
            assert settings.reduction_factor >= 2 and 1 <= settings.grace_period < epochs
            assert not {p.name for p in study.space} & DATASET_KEYS


# ---------------------------------------------------------------------- the data-key guard


def _changed(base: TrialConfig, key: str) -> TrialConfig | None:
    """``base`` with ``key`` set to some other valid value (None: none is valid with the
    base's other keys, as a repetition without the kfold protocol)."""
    value = getattr(base, key)
    if isinstance(value, bool):
        candidates = [not value]
    elif isinstance(value, int):
        candidates = [value + 1, value + 2, value - 1]
    elif isinstance(value, float):
        candidates = [value / 2, value + 0.05, value * 1.5]
    else:
        candidates = [
            "cpu",
            "minority",
            "/data/other",
            "ckplus",
            "synthetic",
            "kfold",
            "ferplus",
            "paper",
            "flip",
            "bf16",
            "sgd",
            "cosine",
            "eca",
            "center",
            "vgg16",
        ]
    for candidate in candidates:
        if candidate == value:
            continue
        try:
            return base.replace(**{key: candidate})
        except ConfigError:
            continue
    return None


BASES = [
    TrialConfig(dataset="synthetic", data_path="/data/unused"),  # so dataset can change
    TrialConfig(dataset="fer2013", data_path="/data/fer2013", attention="none"),
    TrialConfig(dataset="ckplus", data_path="/data/ckplus", protocol="kfold"),
]


class _Split(Exception):
    """Raised by the stand-in make_splits: the engine got as far as splitting."""


def test_the_data_a_trial_sees_depends_only_on_the_guarded_keys(monkeypatch):
    """Every trial-config key that changes engine.data_key, what load_trial_data asks
    load_dataset for, or what fit asks make_splits for, is in DATASET_KEYS; and every key in
    DATASET_KEYS changes one of them. So a new data option in the engine cannot become a tuned
    parameter that the driver's single dataset silently ignores."""
    calls = []
    monkeypatch.setattr(engine, "load_dataset", lambda *a, **kw: calls.append((a, kw)))

    def splits(*args, **kwargs):
        calls.append((args[1:], kwargs))  # not the data itself
        raise _Split

    monkeypatch.setattr(engine, "make_splits", splits)

    def reads(config: TrialConfig) -> tuple:
        calls.clear()
        engine.load_trial_data(config)
        with pytest.raises(_Split):
            engine.fit(config, data=object())
        return engine.data_key(config), list(calls)

    deciding, tried = set(), set()
    for base in BASES:
        before = reads(base)
        for f in fields(TrialConfig):
            changed = _changed(base, f.name)
            if changed is None:
                continue
            tried.add(f.name)
            if reads(changed) != before:
                deciding.add(f.name)
    assert tried == {f.name for f in fields(TrialConfig)}, "add a candidate to _changed"
    assert deciding - DATASET_KEYS == set(), "tuning these would be silently ignored"
    assert DATASET_KEYS - deciding == set(), "these no longer decide the data"


# ---------------------------------------------------------------------- contrasts and seeds


CONTRAST_STUDY = """
name = "c"
kind = "grid"
[[cells]]
name = "a"
[[cells]]
name = "b"
[[cells]]
name = "ab"
[[cells]]
name = "base"
"""


def test_declared_contrasts_load_with_default_labels_and_families(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        CONTRAST_STUDY
        + """
[[contrasts]]
plus = ["a"]
minus = ["base"]
[[contrasts]]
family = "interaction"
plus = ["ab", "base"]
minus = ["a", "b"]
"""
    )
    study = load_study(path)
    pair, interaction = study.comparisons
    assert (pair.family, pair.label, pair.weights) == (
        "comparisons",
        "a vs base",
        {"a": 1, "base": -1},
    )
    assert interaction.label == "(ab + base) - (a + b)"
    assert interaction.weights == {"ab": 1, "base": 1, "a": -1, "b": -1}
    # without declarations: every cell against the reference (the first cell here)
    plain = tmp_path / "plain.toml"
    plain.write_text(CONTRAST_STUDY)
    assert [c.label for c in load_study(plain).comparisons] == ["b vs a", "ab vs a", "base vs a"]


@pytest.mark.parametrize(
    "body, message",
    [
        ('plus = ["a"]\nminus = ["nope"]', "contrasts[0].minus: 'nope' is not a cell"),
        ('plus = ["a"]\nminus = ["b", "base"]', "as many cells each"),
        ('plus = ["a"]\nminus = ["a"]', "cell 'a' is listed twice"),
        ('plus = []\nminus = ["a"]', "contrasts[0].plus: must be a non-empty list"),
        ('plus = ["a"]\nminus = ["b"]\nweight = 2', "contrasts[0].weight: unknown key"),
    ],
)
def test_a_bad_contrast_names_the_file_the_key_and_the_problem(tmp_path, body, message):
    path = tmp_path / "c.toml"
    path.write_text(CONTRAST_STUDY + "[[contrasts]]\n" + body + "\n")
    with pytest.raises(StudyError, match=re.escape(message)) as err:
        load_study(path)
    assert str(err.value).startswith(str(path))


def test_a_preset_may_set_its_seeds_and_the_command_line_wins(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONTRAST_STUDY + "[presets.many]\nseeds = 4\n[presets.few]\nepochs = 2\n")
    study = load_study(path)
    assert [study.seeds_for(p) for p in ("many", "few", None)] == [4, 1, 1]
    assert len(study.trials("many")) == 16
    assert study.with_run(seeds=2).seeds_for("many") == 2
    path.write_text(CONTRAST_STUDY + "[presets.bad]\nseeds = 0\n")
    with pytest.raises(StudyError, match=r"presets\.bad\.seeds: must be at least 1"):
        load_study(path)
