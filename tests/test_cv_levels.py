"""Repeated k-fold as a design, and the simulated levels of the runs question's k-fold tests:
which design the CK+ presets use, and what the report calls a heuristic."""

import math

import numpy as np
import pytest

from fermodel.config import ConfigError, TrialConfig
from fermodel.data import make_splits, make_synthetic
from orchestrate.report import cv_levels, statistics
from orchestrate.report.cv_levels import CORRELATIONS, DESIGNS, MEASURED, SUBJECTS
from search_spaces.study import StudyError, load_study

GRIDS = ("table3", "table4", "table5")


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_subjects=20, images_per_class=2, seed=4)


# ---------------------------------------------------------------------- the design


def test_repetition_0_is_the_old_split_and_later_ones_redraw_subject_independent_folds(data):
    def tested(repetition: int) -> list[frozenset]:
        return [
            frozenset(
                make_splits(
                    data, "kfold", fold=f, folds=5, seed=3, repetition=repetition
                ).test.subjects
            )
            for f in range(5)
        ]

    old = [
        frozenset(make_splits(data, "kfold", fold=f, folds=5, seed=3).test.subjects)
        for f in range(5)
    ]
    assert tested(0) == old
    again, other = tested(1), tested(2)
    assert again == tested(1)  # a drawing is the same whenever it is made
    assert set(again) != set(old) and set(other) != set(again)
    for drawing in (again, other):  # each drawing is a partition of the subjects
        assert sum(len(s) for s in drawing) == len(set(data.subjects))
        assert frozenset().union(*drawing) == frozenset(data.subjects)
    s = make_splits(data, "kfold", fold=2, folds=5, seed=3, repetition=1)
    assert not set(s.train.subjects) & set(s.test.subjects)
    assert not set(s.train.subjects) & set(s.val.subjects)
    assert s.notes[0].endswith("of repetition 1")


def test_repetition_needs_the_kfold_protocol():
    with pytest.raises(
        ConfigError,
        match="repetition: 1 re-draws the kfold protocol's folds; protocol official has none",
    ):
        TrialConfig(repetition=1)
    assert TrialConfig(protocol="kfold", repetition=1).repetition == 1


def test_a_repeated_study_runs_every_fold_of_every_drawing_and_keeps_old_identities():
    study = load_study("table4").with_run(dataset="ckplus", data_path="/data/ck")
    one = study.trials("paper")
    twice = study.with_run(repetitions=2).trials("paper")
    assert len(twice) == 2 * len(one) == 4 * 3 * 2 * 10
    # repetition 0 is the single split, trial for trial: its finished trials still count
    first = [t for t in twice if t.repetition == 0]
    assert [(t.key, t.identity) for t in first] == [(t.key, t.identity) for t in one]
    later = [t for t in twice if t.repetition == 1]
    assert later[0].key == "basic-seed0-rep1-fold0" and later[0].config.repetition == 1
    assert not {t.identity for t in later} & {t.identity for t in one}
    # protocols without folds ignore it, as they ignore folds; tuning studies refuse it
    fer = load_study("table4").with_run(dataset="fer2013", data_path="/d.csv", repetitions=3)
    assert len(fer.trials("paper")) == 4 * 3
    with pytest.raises(StudyError, match="repetitions: repeated k-fold is a grid study's"):
        load_study("hpo").with_run(repetitions=2)
    with pytest.raises(StudyError, match="repetitions: must be at least 1, got 0"):
        study.with_run(repetitions=0)


def test_the_repeated_test_counts_every_drawings_folds():
    rng = np.random.default_rng(1)
    diffs = {(s, unit): float(rng.normal(1, 2)) for s in range(2) for unit in range(30)}
    result = statistics.across_runs(diffs, 1 / 8, repetitions=3)
    means = np.array([np.mean([diffs[s, u] for s in range(2)]) for u in range(30)])
    t = means.mean() / (means.std(ddof=1) * math.sqrt(1 / 30 + 1 / 8))
    assert result["p_value"] == pytest.approx(2 * statistics.stats.t.sf(abs(t), 29))
    assert result["n_units"] == 30 and result["repetitions"] == 3
    assert result["method"].startswith("corrected repeated k-fold t-test (Bouckaert & Frank")
    assert result["p_by_correlation"] == {}  # the one-split sensitivity is not this design's
    single = statistics.across_runs(diffs, 1 / 8)
    assert single["p_value"] == pytest.approx(result["p_value"])
    assert set(single["p_by_correlation"]) == set(statistics.FOLD_CORRELATIONS)


# ---------------------------------------------------------------------- the simulation


def test_the_simulated_folds_correlate_as_asked_and_drawings_more():
    """The model's premise: within one drawing the folds' differences correlate at rho; runs
    of two drawings share test subjects too, so they correlate more."""
    rng = np.random.default_rng(0)
    for rho in (0.0, 0.25):
        studies = np.array([cv_levels.null_study(100, rho, 2, rng)[0] for _ in range(4000)])
        corr = np.corrcoef(studies.T)
        within = corr[:10, :10][~np.eye(10, dtype=bool)].mean()
        across = corr[:10, 10:].mean()
        assert within == pytest.approx(rho, abs=0.02)
        assert across > within + 0.05


@pytest.mark.slow
def test_no_design_holds_its_level_and_the_presets_use_the_closest():
    """400 null studies an entry (docs/report.md's table has 2,000): the level of each design over
    fold correlations 0-0.35 and 6, 20, 100 subjects."""
    table = cv_levels.level_table(studies=400)
    levels = table.set_index(["design", "subjects"])[list(CORRELATIONS)]
    one = levels.loc["one k-fold split"]
    # the corrected test is right where its assumption holds (rho = n_test/n_train = 1/8 to 1/9)
    assert one.loc[[20, 100], 1 / 9].between(0.025, 0.08).all()
    assert (one[0.0] < 0.03).all() and (one.loc[[20, 100], 0.35] > 0.12).all()
    # repetition shrinks the variance the test assumes, not the correlation: it rejects more
    for design in ("3 x repeated k-fold", "10 x repeated k-fold"):
        assert (levels.loc[design][0.35] > one[0.35]).all()
    # the report's quoted ranges are docs/report.md's table's, within this run's Monte Carlo error
    kinds = {
        "one k-fold split": ["one k-fold split"],
        "repeated k-fold": ["3 x repeated k-fold", "10 x repeated k-fold"],
    }
    for kind, designs in kinds.items():
        these = levels.loc[designs].to_numpy()
        assert these.min() == pytest.approx(MEASURED[kind][0], abs=0.02)
        assert these.max() == pytest.approx(MEASURED[kind][1], abs=0.06)
    best = cv_levels.closest_design(table)
    assert best == "one k-fold split"
    assert not any(cv_levels.holds(table, d) for d in DESIGNS)  # so: a heuristic, said so
    for name in GRIDS:
        study = load_study(name).with_run(dataset="ckplus", data_path="/data/ck")
        assert study.repetitions == DESIGNS[best], name
    text = cv_levels.markdown(table, 400)
    assert text.count("\n| ") == len(DESIGNS) * len(SUBJECTS)  # the rows below the header
    assert "closest to 5% across the table: one k-fold split" in text
