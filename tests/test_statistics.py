"""orchestrate.statistics on planted data with hand-computed answers: per-cell t intervals,
the paired image-level comparison (difference, bootstrap CI, sign-flip and McNemar p-values),
trial pairing and Holm's correction."""

import math

import pytest

from orchestrate.statistics import Predictions, holm, paired_comparison, summarize_accuracies

CLASSES = 7


def trial(correct, seed=0, fold=0, ids=None, labels=None):
    """A trial whose prediction is right exactly where ``correct`` is truthy."""
    ids = ids if ids is not None else [f"img{i:04d}" for i in range(len(correct))]
    labels = labels if labels is not None else [i % CLASSES for i in range(len(correct))]
    predictions = [y if ok else (y + 1) % CLASSES for y, ok in zip(labels, correct, strict=True)]
    return Predictions(seed, fold, list(ids), list(labels), predictions)


# summarize_accuracies


def test_summary_matches_hand_computed_t_interval():
    # mean 82, deviations -2, 0, 2 -> s^2 = 8 / 2 = 4, s = 2; t(0.975, df=2) = 4.302653 (table)
    s = summarize_accuracies([80.0, 82.0, 84.0])
    half = 4.302653 * 2 / math.sqrt(3)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(82.0)
    assert s["std"] == pytest.approx(2.0)
    assert s["ci_low"] == pytest.approx(82.0 - half, abs=1e-5)
    assert s["ci_high"] == pytest.approx(82.0 + half, abs=1e-5)


def test_summary_of_one_value_has_no_spread_and_of_equal_values_a_point_interval():
    one = summarize_accuracies([71.5])
    assert (one["n"], one["mean"]) == (1, 71.5)
    assert all(math.isnan(one[k]) for k in ("std", "ci_low", "ci_high"))
    same = summarize_accuracies([70.0, 70.0])
    assert (same["std"], same["ci_low"], same["ci_high"]) == (0.0, 70.0, 70.0)
    assert math.isnan(summarize_accuracies([])["mean"])


# paired_comparison: planted effects


def planted_gain(seeds=3):
    """300 images: the reference is right on the first 180 (60%), the other cell on those and 45
    more (+15%, never worse); every seed predicts the same."""
    ref = [trial([i < 180 for i in range(300)], seed=s) for s in range(seeds)]
    oth = [trial([i < 225 for i in range(300)], seed=s) for s in range(seeds)]
    return ref, oth


def test_planted_real_difference_is_significant():
    ref, oth = planted_gain()
    r = paired_comparison(ref, oth, n_resamples=2000)
    assert r["difference"] == 15.0  # 45 of 300 images, hand-computed
    assert (r["n_images"], r["n_pairs"], r["n_changed"]) == (300, 3, 45)
    assert (r["reference_accuracy"], r["other_accuracy"]) == (60.0, 75.0)
    assert r["p_value"] < 0.01
    assert not r["p_exact"]
    # no random sign vector of the 2000 reaches all 45 positive; the observed statistic counts
    # as one resample on each side: two-sided p = 2 * (0 + 1) / (2000 + 1)
    assert r["p_value"] == pytest.approx(2 / 2001)
    assert 0 < r["ci_low"] < 15.0 < r["ci_high"]
    assert math.isnan(r["mcnemar_p"])  # three seeds: the pooled counts are not independent
    assert "sign-flip permutation" in r["method"] and "percentile bootstrap" in r["method"]


def test_planted_null_is_not_significant():
    # 150 both right, 30 only the reference, 30 only the other, 90 both wrong: both 60%
    ref = [trial([i < 180 for i in range(300)], seed=s) for s in range(3)]
    oth = [trial([i < 150 or 180 <= i < 210 for i in range(300)], seed=s) for s in range(3)]
    r = paired_comparison(ref, oth, n_resamples=2000)
    assert r["difference"] == 0.0
    assert (r["reference_accuracy"], r["other_accuracy"]) == (60.0, 60.0)
    assert r["p_value"] > 0.5
    assert r["ci_low"] < 0.0 < r["ci_high"]


def test_correctness_is_averaged_over_seeds_per_image():
    # 4 images, 2 seeds. reference right: seed 0 on {0, 1}, seed 1 on {0}
    # -> per image 1, 1/2, 0, 0; other right: seed 0 on {0, 1, 2}, seed 1 on {0, 1}
    # -> 1, 1, 1/2, 0. d = 0, 1/2, 1/2, 0: difference = 100 * 1 / 4 = 25 points.
    ref = [trial([1, 1, 0, 0], seed=0), trial([1, 0, 0, 0], seed=1)]
    oth = [trial([1, 1, 1, 0], seed=0), trial([1, 1, 0, 0], seed=1)]
    r = paired_comparison(ref, oth)
    assert r["difference"] == 25.0
    assert (r["n_images"], r["n_pairs"], r["n_changed"]) == (4, 2, 2)
    # exact sign flips of (1/2, 1/2): sums 1, 0, 0, -1; P(>= 1) = 1/4, two-sided 1/2
    assert r["p_exact"]
    assert r["p_value"] == pytest.approx(0.5)


# McNemar, one (seed, fold) pair


def test_mcnemar_matches_hand_computation_and_the_exact_sign_flip_test():
    # 40 images: 20 both right, 10 only the reference (b), 2 only the other (c), 8 both wrong
    ref = [i < 30 for i in range(40)]
    oth = [i < 20 or 30 <= i < 32 for i in range(40)]
    r = paired_comparison([trial(ref)], [trial(oth)])
    # two-sided exact binomial: 2 * P(X <= 2 | n = 12, 1/2) = 2 * (1 + 12 + 66) / 4096
    expected = 2 * (1 + 12 + 66) / 4096
    assert expected == pytest.approx(0.0385742, abs=1e-7)
    assert r["mcnemar_p"] == pytest.approx(expected)
    # 12 discordant images, 2**12 <= 10000 sign vectors: the permutation test is exact and,
    # with one seed, it is McNemar's test
    assert r["p_exact"]
    assert r["p_value"] == pytest.approx(expected)
    assert r["difference"] == pytest.approx(100 * (2 - 10) / 40)
    assert r["n_pairs"] == 1
    assert "McNemar" in r["method"]


def test_identical_predictions_give_no_difference():
    cell = [trial([i % 3 != 0 for i in range(50)])]
    r = paired_comparison(cell, cell)
    assert r["difference"] == 0.0
    assert (r["ci_low"], r["ci_high"]) == (0.0, 0.0)
    assert r["p_value"] == 1.0
    assert r["mcnemar_p"] == 1.0


# pairing


def test_trials_missing_on_one_side_and_unshared_images_are_ignored():
    correct = [i < 6 for i in range(10)]
    ref = [trial(correct, seed=s) for s in (0, 1, 2)]
    # the other cell lacks seed 2, has a fold the reference lacks, and seed 1 lost two images
    oth = [
        trial([True] * 10, seed=0),
        trial([True] * 8, seed=1, ids=[f"img{i:04d}" for i in range(8)]),
        trial([False] * 10, seed=0, fold=1),
    ]
    r = paired_comparison(ref, oth)
    assert r["n_pairs"] == 2
    assert r["n_images"] == 10
    # images 0-5 right in both; 6, 7 gain 1 in both seeds; 8, 9 gain 1 in seed 0 only (the
    # one seed where both cells saw them): d = 1, 1, 1, 1 over 10 images -> 40 points
    assert r["difference"] == pytest.approx(40.0)


def test_mismatched_label_names_the_image():
    labels = [0, 1, 2, 3]
    ref = [trial([1, 1, 1, 1], labels=labels)]
    oth = [trial([1, 1, 1, 1], labels=[0, 1, 5, 3])]
    with pytest.raises(ValueError, match="img0002"):
        paired_comparison(ref, oth)


def test_pairs_without_shared_images_or_trials_are_errors():
    ref = [trial([1, 0], ids=["a", "b"])]
    with pytest.raises(ValueError, match="share no test image"):
        paired_comparison(ref, [trial([1, 0], ids=["c", "d"])])
    with pytest.raises(ValueError, match="share no"):
        paired_comparison(ref, [trial([1, 0], ids=["a", "b"], seed=1)])
    with pytest.raises(ValueError, match="more than once"):
        trial([1, 1], ids=["a", "a"])


def test_kfold_uses_every_image_once():
    # 3 folds of 20 disjoint images, one seed; the other cell gains 2 images in each fold
    ref, oth = [], []
    for fold in range(3):
        ids = [f"f{fold}-{i}" for i in range(20)]
        ref.append(trial([i < 10 for i in range(20)], fold=fold, ids=ids))
        oth.append(trial([i < 12 for i in range(20)], fold=fold, ids=ids))
    r = paired_comparison(ref, oth)
    assert (r["n_images"], r["n_pairs"], r["n_changed"]) == (60, 3, 6)
    assert r["difference"] == pytest.approx(100 * 6 / 60)
    assert math.isnan(r["mcnemar_p"])  # three pairs: not the single-pair McNemar setting
    # 6 images all +1 out of 2**6 exact sign vectors: two-sided p = 2 / 64
    assert r["p_value"] == pytest.approx(2 / 64)


def test_same_seed_same_result():
    ref, oth = planted_gain(seeds=2)
    oth[1] = trial([i < 200 or i in (0, 1, 2) for i in range(300)], seed=1)
    a = paired_comparison(ref, oth, n_resamples=500, seed=7)
    b = paired_comparison(ref, oth, n_resamples=500, seed=7)
    assert a == b


# holm


def test_holm_hand_example():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_holm_passes_nan_through_and_does_not_count_it():
    out = holm([0.01, math.nan, 0.04, 0.03])
    assert math.isnan(out[1])
    assert [out[0], out[2], out[3]] == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    with pytest.raises(ValueError):
        holm([1.5])


def test_a_single_changed_image_gives_p_one():
    ids = [f"i{k}" for k in range(20)]
    labels = [0] * 20
    ref = [Predictions(0, 0, ids, labels, [0] * 20)]
    other = [Predictions(0, 0, ids, labels, [1] + [0] * 19)]  # one image turns wrong
    result = paired_comparison(ref, other, n_resamples=1000)
    assert result["difference"] == pytest.approx(-5.0) and result["p_value"] == 1.0
    assert result["mcnemar_p"] == pytest.approx(1.0)
