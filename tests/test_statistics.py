"""orchestrate.report.statistics on planted data with hand-computed answers: per-cell t intervals,
question 1 "on this test set" (difference, bootstrap CI, the exact sign-flip p-value, over
images or over subjects, for pairs and for interactions), question 2 "across training runs"
(paired t-test over seeds; the corrected k-fold t-test over (seed, fold) runs, checked by
simulation under the null), both noise floors, trial pairing and Holm's correction."""

import math

import numpy as np
import pytest
from scipy import stats

from orchestrate.report import statistics
from orchestrate.report.statistics import (
    ALPHA,
    Predictions,
    across_runs,
    compare,
    compare_cells,
    holm,
    minimum_detectable_runs_difference,
    on_test_set,
    paired_comparison,
    run_comparison,
    run_differences,
    seeds_needed,
    seeds_needed_kfold,
    sign_flip_p,
    significant_share,
    summarize_accuracies,
    summarize_runs,
)

CLASSES = 7


def trial(correct, seed=0, fold=0, ids=None, labels=None, groups=None):
    """A trial whose prediction is right exactly where ``correct`` is truthy."""
    ids = ids if ids is not None else [f"img{i:04d}" for i in range(len(correct))]
    labels = labels if labels is not None else [i % CLASSES for i in range(len(correct))]
    predictions = [y if ok else (y + 1) % CLASSES for y, ok in zip(labels, correct, strict=True)]
    return Predictions(seed, fold, list(ids), list(labels), predictions, groups)


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
    assert (r["n_images"], r["n_runs"], r["n_changed"]) == (300, 3, 45)
    assert (r["reference_accuracy"], r["other_accuracy"]) == (60.0, 75.0)
    # exact: of the 2**45 sign vectors of 45 images all +1, two reach |sum| = 45
    assert r["p_exact"] and r["p_error"] == 0
    assert r["p_value"] == pytest.approx(2 / 2**45)
    assert 0 < r["ci_low"] < 15.0 < r["ci_high"]
    # three seeds of the same images: not McNemar's single-trial setting
    assert "McNemar" not in r["method"]
    assert "sign-flip test over images (exact)" in r["method"] and "bootstrap" in r["method"]


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
    assert (r["n_images"], r["n_runs"], r["n_changed"]) == (4, 2, 2)
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
    # the exact sign-flip test with one seed is McNemar's test
    assert r["p_exact"]
    assert r["p_value"] == pytest.approx(expected)
    assert r["p_value"] == pytest.approx(stats.binomtest(2, 12, 0.5).pvalue)
    assert r["difference"] == pytest.approx(100 * (2 - 10) / 40)
    assert r["n_runs"] == 1
    assert "McNemar" in r["method"]


def test_identical_predictions_give_no_difference():
    cell = [trial([i % 3 != 0 for i in range(50)])]
    r = paired_comparison(cell, cell)
    assert r["difference"] == 0.0
    # no interval beside p = 1: nothing changed, so nothing says how far it could
    assert math.isnan(r["ci_low"]) and r["note"] == "n/a: no test image changed"
    assert r["p_value"] == 1.0


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
    assert r["n_runs"] == 2
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
    assert (r["n_images"], r["n_runs"], r["n_changed"]) == (60, 3, 6)
    assert r["difference"] == pytest.approx(100 * 6 / 60)
    assert "McNemar" not in r["method"]  # three folds: not the single-trial setting
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


# question 1 with groups: the subject is the unit


def clustered_case():
    """30 subjects of 10 images, one seed. 12 subjects gain on all their images (the other cell
    right, the reference wrong), 6 lose on all of them, 12 are the same in both cells: the images
    of a subject are perfectly correlated. Image-level difference (120 - 60) / 300 = 20 points
    either way; what changes is how many independent units carry it (180 images or 18
    subjects)."""
    ref, oth = [], []
    for subject in range(30):
        for i in range(10):
            same = i % 2 == 0
            ref.append(same if subject >= 18 else 12 <= subject < 18)
            oth.append(same if subject >= 18 else subject < 12)
    groups = [f"S{k // 10:03d}" for k in range(300)]
    return ref, oth, groups


def test_clustered_units_widen_the_interval_and_raise_the_noise_floor():
    ref, oth, groups = clustered_case()
    images = paired_comparison([trial(ref)], [trial(oth)], n_resamples=4000)
    subjects = paired_comparison(
        [trial(ref, groups=groups)], [trial(oth, groups=groups)], n_resamples=4000
    )
    assert images["difference"] == subjects["difference"] == 20.0
    assert (images["unit"], images["n_units"], images["n_units_changed"]) == ("image", 300, 180)
    assert (subjects["unit"], subjects["n_units"], subjects["n_units_changed"]) == (
        "subject",
        30,
        18,
    )
    # per-unit means are +1, -1, 0 in the same proportions (12:6:12) at both levels, so the
    # bootstrap SE grows by sqrt(300 / 30) = sqrt(10) = 3.16: the interval widens about that much
    width_images = images["ci_high"] - images["ci_low"]
    width_subjects = subjects["ci_high"] - subjects["ci_low"]
    assert 2.6 < width_subjects / width_images < 3.8
    assert subjects["ci_low"] < 0 < images["ci_low"]  # clear on images, not on 30 subjects
    assert images["p_value"] < 0.001 < 0.05 < subjects["p_value"]
    # noise floor: sum of squared unit sums is 180 (images) and 18 * 10**2 = 1800 (subjects),
    # sqrt(10) apart in the normal limit; 30 subjects count the sign-flip test's own power
    assert subjects["mde"] / images["mde"] == pytest.approx(math.sqrt(10), rel=0.1)
    # McNemar assumes independent images: it is the test only where images are the units
    assert "McNemar" in images["method"] and "McNemar" not in subjects["method"]
    assert "sign-flip test inverted" in subjects["method"] and "over subjects" in subjects["method"]
    assert "percentile bootstrap over images" in images["method"]


def test_without_groups_an_image_is_its_own_unit():
    # old artifacts (no groups), FER2013 (groups of None) and one subject per image all give the
    # image-level comparison, to the last digit
    correct_r = [i < 180 for i in range(300)]
    correct_o = [i < 150 or 180 <= i < 215 for i in range(300)]
    results = [
        paired_comparison(
            [trial(correct_r, groups=g)], [trial(correct_o, groups=g)], n_resamples=2000
        )
        for g in (None, [None] * 300, [f"s{i}" for i in range(300)])
    ]
    assert results[0] == results[1]
    numbers = {k: v for k, v in results[2].items() if k not in ("unit", "method")}
    assert numbers == {k: v for k, v in results[0].items() if k not in ("unit", "method")}
    assert results[0]["unit"] == "image" and results[2]["unit"] == "subject"


def test_a_trial_without_groups_takes_them_from_the_other_cell():
    ref, oth, groups = clustered_case()
    old = paired_comparison([trial(ref)], [trial(oth, groups=groups)], n_resamples=500)
    assert (old["unit"], old["n_units"]) == ("subject", 30)
    # only some images name a subject: the rest are their own units
    partial = groups[:150] + [None] * 150
    mixed = paired_comparison([trial(ref, groups=partial)], [trial(oth)], n_resamples=500)
    assert (mixed["unit"], mixed["n_units"]) == ("subject or image", 15 + 150)


def test_conflicting_or_misaligned_groups_are_errors():
    with pytest.raises(ValueError, match="img0001.*group"):
        paired_comparison([trial([1, 1], groups=["a", "a"])], [trial([1, 0], groups=["a", "b"])])
    with pytest.raises(ValueError, match="differ in length"):
        trial([1, 1], groups=["a"])


# question 2: across training runs


def contradicting_seeds():
    """Three seeds on one fixed test set of 300 images; both cells are right on images 0-149.
    Seed 0: the other cell is also right on 36 more images (+12 points). Seed 1: the reference is
    right on 12 images the other misses (-4). Seed 2: the other gains 12 images (+4). The images
    each seed moves are disjoint, so each of those 60 images has d_i = +-1/3 after averaging over
    the seeds."""
    moves = {0: (range(150, 186), ()), 1: ((), range(186, 198)), 2: (range(198, 210), ())}
    ref, oth = [], []
    for seed, (gained, lost) in moves.items():
        ref.append(trial([i < 150 or i in lost for i in range(300)], seed=seed))
        oth.append(trial([i < 150 or i in gained for i in range(300)], seed=seed))
    return ref, oth


def test_a_gain_on_this_test_set_that_does_not_survive_another_seed():
    """The two questions are consistent and still disagree. The seed-averaged image-level
    difference is the mean of the per-seed differences (the same 300 images in every seed):
    (12 - 4 + 4) / 3 = 4 points either way. But their noise differs. On this test set, 48 images
    moved up and 12 down (each by 1/3): a sign-flip test over 60 changed images sees a z of about
    (48 - 12) / sqrt(60) = 4.6, so these three trained models of the other cell are, on average,
    better on these images. Across runs, the three run differences +12, -4, +4 have mean 4 and
    SD 8: t = 4 / (8 / sqrt(3)) = 0.87 with 2 degrees of freedom, p = 0.48. One lucky seed
    carries the image-level result; another training seed may as well lose."""
    ref, oth = contradicting_seeds()
    result = compare_cells(ref, oth, n_resamples=4000)
    test_set, runs = result["test_set"], result["runs"]
    assert test_set["difference"] == pytest.approx(4.0)
    assert (test_set["n_changed"], test_set["n_units"], test_set["n_runs"]) == (60, 300, 3)
    assert test_set["p_value"] < 0.001 and test_set["ci_low"] > 0
    assert runs["difference"] == pytest.approx(4.0) and runs["sd"] == pytest.approx(8.0)
    t = 4.0 / (8.0 / math.sqrt(3))
    assert runs["p_value"] == pytest.approx(2 * stats.t.sf(t, df=2))
    assert runs["p_value"] > 0.4
    half = stats.t.ppf(0.975, df=2) * 8.0 / math.sqrt(3)
    assert (runs["ci_low"], runs["ci_high"]) == pytest.approx((4.0 - half, 4.0 + half))
    assert runs["judged"] and runs["ci_low"] < 0 < runs["ci_high"]
    assert (runs["n_runs"], runs["n_seeds"], runs["n_folds"]) == (3, 3, 1)


def test_run_differences_are_taken_on_the_shared_images():
    ref, oth = contradicting_seeds()
    # seed 2 of the other cell was tested on the first 200 images only, right on 162 of them
    oth[2] = trial([i < 162 for i in range(200)], seed=2, ids=[f"img{i:04d}" for i in range(200)])
    d = run_differences({"r": ref, "o": oth}, {"o": 1, "r": -1})
    # seeds 0, 1 on 300 images: 150/186 and 162/150 right; seed 2 on the 200 shared: 150, 162
    assert d == pytest.approx({(0, 0): 62.0 - 50.0, (1, 0): 50.0 - 54.0, (2, 0): 81.0 - 75.0})


def test_one_seed_and_one_fold_cannot_be_judged_across_runs():
    runs = run_comparison({(0, 0): 70.0}, {(0, 0): 75.0})
    assert runs["note"] == "n/a: 1 seed x 1 fold" and not runs["judged"]
    assert runs["difference"] == 5.0 and runs["n_runs"] == 1
    for key in ("p_value", "ci_low", "ci_high", "sd", "mde", "seeds_needed"):
        assert math.isnan(runs[key]), key
    # through compare_cells, one trial per cell: question 1 still answers (McNemar), 2 does not
    result = compare_cells(
        [trial([i < 30 for i in range(40)])], [trial([i < 35 for i in range(40)])]
    )
    assert result["runs"]["note"] == "n/a: 1 seed x 1 fold"
    assert result["test_set"]["p_value"] == pytest.approx(2 / 32)
    # Holm does not count a question that was not asked
    assert holm([result["runs"]["p_value"], 0.02]) == [pytest.approx(math.nan, nan_ok=True), 0.02]
    assert run_comparison({(0, 0): 70.0}, {(1, 0): 75.0})["note"] == "n/a: no joined runs"


def test_identical_run_differences_fall_back_on_the_exact_sign_flip():
    same = run_comparison({(s, 0): 70.0 for s in range(3)}, {(s, 0): 71.0 for s in range(3)})
    assert same["p_value"] == pytest.approx(2 / 8)  # all three +1: 2 of 8 sign vectors
    assert (same["ci_low"], same["ci_high"]) == (1.0, 1.0) and math.isnan(same["mde"])
    none = run_comparison({(s, 0): 70.0 for s in range(2)}, {(s, 0): 70.0 for s in range(2)})
    assert none["p_value"] == 1.0 and none["difference"] == 0.0
    # on folds the corrected test has no variance to scale by: not judged rather than guessed
    folds = across_runs({(0, f): 1.0 for f in range(5)}, fold_ratio=1 / 3)
    assert not folds["judged"] and folds["note"] == "n/a: every run has the same difference"


# noise floors


def test_test_set_noise_floor_matches_the_paired_proportions_formula():
    """400 images, one seed: b = 30 images only the reference gets right, c = 18 only the other.
    The paired-proportions normal approximation with the observed discordance p = 48 / 400 gives
    the smallest detectable difference (z_0.975 + z_0.80) * sqrt(p / 400); an exact binomial
    calculation of McNemar's test's power at that difference comes out near 80% too."""
    n, b, c = 400, 30, 18
    ref = [i < 100 or 100 <= i < 130 for i in range(n)]
    oth = [i < 100 or 130 <= i < 148 for i in range(n)]
    result = paired_comparison([trial(ref)], [trial(oth)], n_resamples=500)
    discordance = (b + c) / n
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.80)  # 1.959964 + 0.841621
    expected = 100 * z * math.sqrt(discordance / n)
    assert expected == pytest.approx(4.8525, abs=1e-4)
    assert result["mde"] == pytest.approx(expected)
    assert result["difference"] == pytest.approx(100 * (c - b) / n)
    # power of the exact two-sided McNemar test at delta = mde, discordance p: the discordant
    # count D ~ Binomial(n, p), and given D the gains c ~ Binomial(D, (1 + delta / p) / 2)
    delta = expected / 100
    power = 0.0
    for d, weight in enumerate(stats.binom.pmf(np.arange(n + 1), n, discordance)):
        if d == 0 or weight < 1e-12:
            continue
        gains = np.arange(d + 1)
        tail = np.minimum(stats.binom.cdf(gains, d, 0.5), stats.binom.sf(gains - 1, d, 0.5))
        reject = np.minimum(1.0, 2 * tail) <= 0.05
        power += weight * stats.binom.pmf(gains, d, (1 + delta / discordance) / 2)[reject].sum()
    assert 0.74 < power < 0.84  # 0.777: the exact test is discrete, the floor a normal one


def test_noise_floor_on_seed_averaged_images_is_the_sign_flip_null_sd():
    # contradicting_seeds: 60 images with d = +-1/3, the rest 0: sum of d**2 = 60 / 9
    ref, oth = contradicting_seeds()
    result = paired_comparison(ref, oth, n_resamples=500)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.80)
    assert result["mde"] == pytest.approx(100 * z * math.sqrt(60 / 9) / 300)


def nct_power(delta: float, se: float, df: int) -> float:
    """Power of the two-sided t-test at level 0.05 for a true mean delta, standard error se."""
    crit = stats.t.ppf(0.975, df)
    ncp = delta / se
    return float(stats.nct.sf(crit, df, ncp) + np.nan_to_num(stats.nct.cdf(-crit, df, ncp)))


def test_runs_noise_floor_is_the_noncentral_t_80_percent_point_and_seeds_needed_its_search():
    # four seeds on one split; differences 1, 3, 2, 6: mean 3, squared deviations 4 + 0 + 1 + 9
    reference = {(s, 0): 70.0 for s in range(4)}
    other = {(0, 0): 71.0, (1, 0): 73.0, (2, 0): 72.0, (3, 0): 76.0}
    runs = run_comparison(reference, other)
    sd = math.sqrt(14 / 3)
    assert runs["sd"] == pytest.approx(sd) and not runs["corrected"]
    assert runs["p_value"] == pytest.approx(stats.ttest_1samp([1, 3, 2, 6], 0).pvalue)
    # the floor is where the noncentral-t power is 80%, computed here with scipy directly
    assert nct_power(runs["mde"], sd / 2, df=3) == pytest.approx(0.80, abs=1e-4)
    assert minimum_detectable_runs_difference(sd, 4) == pytest.approx(runs["mde"])
    # the fewest seeds whose floor reaches the observed 3 points, by direct search
    k = 2
    while minimum_detectable_runs_difference(sd, k) > 3:
        k += 1
    assert (
        nct_power(3.0, sd / math.sqrt(k), k - 1)
        >= 0.80
        > nct_power(3.0, sd / math.sqrt(k - 1), k - 2)
    )
    assert runs["seeds_needed"] == k
    assert seeds_needed(0.0, sd) == math.inf and math.isnan(seeds_needed(1.0, 0.0))
    assert math.isnan(minimum_detectable_runs_difference(sd, 1))


# question 2 on k-fold CV: the folds' training sets overlap


def test_the_corrected_k_fold_test_averages_each_fold_over_its_seeds_and_corrects_the_variance():
    # two seeds x three folds: fold means 3.5, 1.5, 3.0 (mean 8/3); ratio 1/3 (3 folds: test 1,
    # validation 1, train 1)
    d = {(0, 0): 1.0, (0, 1): 3.0, (0, 2): 2.0, (1, 0): 6.0, (1, 1): 0.0, (1, 2): 4.0}
    means = [3.5, 1.5, 3.0]
    r = across_runs(d, fold_ratio=1 / 3)
    assert r["corrected"] and (r["n_runs"], r["n_seeds"], r["n_folds"], r["n_units"]) == (
        6,
        2,
        3,
        3,
    )
    assert r["difference"] == pytest.approx(np.mean(means))
    s = np.std(means, ddof=1)
    se = s * math.sqrt(1 / 3 + 1 / 3)
    assert r["sd"] == pytest.approx(s)
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(np.mean(means) / se, df=2))
    half = stats.t.ppf(0.975, 2) * se
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(
        (np.mean(means) - half, np.mean(means) + half)
    )
    assert nct_power(r["mde"], se, df=2) == pytest.approx(0.80, abs=1e-4)
    # the naive test over six "independent" runs is more confident than it may be
    assert stats.ttest_1samp(list(d.values()), 0).pvalue < r["p_value"]
    assert "corrected k-fold t-test" in r["method"] and "averaged over its seeds" in r["method"]
    # seeds: the within-fold variance (pooled over folds: 12.5, 4.5, 2 -> 19/3) shrinks with
    # more seeds, the folds' own part (s**2 - within / 2, here below 0: 0) does not
    within = np.mean([np.var([1, 6], ddof=1), np.var([3, 0], ddof=1), np.var([2, 4], ddof=1)])
    between = max(0.0, s**2 - within / 2)
    expected = seeds_needed_kfold(r["difference"], between, within, 3, 1 / 3)
    assert r["seeds_needed"] == expected
    sd_at = lambda n: math.sqrt(between + within / n)  # noqa: E731
    assert minimum_detectable_runs_difference(sd_at(expected), 3, 1 / 3) <= r["difference"]
    assert minimum_detectable_runs_difference(sd_at(expected - 1), 3, 1 / 3) > r["difference"]
    # a fold effect that seeds cannot average away: no number of seeds is enough
    assert seeds_needed_kfold(0.5, between=4.0, within=1.0, folds=10, fold_ratio=1 / 8) == (
        math.inf
    )
    # with one seed the folds are tested as they are, corrected the same way; no seeds needed
    one = across_runs({(0, f): v for f, v in enumerate([1.0, 3.0, 2.0, 6.0])}, 1 / 8)
    se1 = np.std([1, 3, 2, 6], ddof=1) * math.sqrt(1 / 4 + 1 / 8)
    assert one["corrected"] and one["p_value"] == pytest.approx(2 * stats.t.sf(3 / se1, df=3))
    assert math.isnan(one["seeds_needed"])  # seed noise and fold effect cannot be told apart
    with pytest.raises(ValueError, match="test/train size ratio"):
        across_runs(d)  # folds without their ratio: no honest answer


def test_a_cells_interval_on_k_fold_is_the_corrected_one_over_its_fold_means():
    accuracies = {(0, 0): 90.0, (0, 1): 94.0, (1, 0): 92.0, (1, 1): 98.0}
    summary = summarize_runs(accuracies, fold_ratio=1 / 8)
    assert summary["mean"] == 93.5 and summary["std"] == pytest.approx(
        np.std(list(accuracies.values()), ddof=1)
    )
    means = [91.0, 96.0]
    half = stats.t.ppf(0.975, 1) * np.std(means, ddof=1) * math.sqrt(1 / 2 + 1 / 8)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((93.5 - half, 93.5 + half))
    # on one split the seeds are the unit, as summarize_accuracies has it
    fixed = summarize_runs({(s, 0): v for s, v in enumerate([80.0, 82.0, 84.0])})
    assert fixed == summarize_accuracies([80.0, 82.0, 84.0])


def simulated_studies(rng, studies, seeds, folds, fold_sd, noise_sd, ratio, true=0.0):
    """Per study the (seed, fold) differences D = true + g + a_f + e_sf: g shared by every run
    (the folds' training sets overlap: its variance is ratio times a fold's, as Nadeau and
    Bengio's correction assumes), a_f a fold's own effect shared by its seeds (its test
    subjects and training set), e_sf a seed's noise."""
    fold_variance = fold_sd**2 + noise_sd**2 / seeds
    shared = rng.normal(0, math.sqrt(ratio * fold_variance), size=(studies, 1, 1))
    fold_effect = rng.normal(0, fold_sd, size=(studies, 1, folds))
    seed_noise = rng.normal(0, noise_sd, size=(studies, seeds, folds))
    return true + shared + fold_effect + seed_noise


@pytest.mark.parametrize("seeds", [1, 3])
def test_the_corrected_test_keeps_its_level_under_fold_correlated_nulls_where_the_naive_fails(
    seeds,
):
    """2000 simulated 10-fold studies with no true difference (ratio 1/8: test 1 fold,
    validation 1, train 8): the corrected test calls at most 7% of them significant at 0.05
    (about 5%). The naive t-test over the same (seed, fold) runs, which treats them as
    independent, calls over 15% (about 17% with one seed, where it ignores the overlap; about
    43% with three, where each fold's effect also repeats in every seed). A true difference of
    twice a run's noise is still found in most draws."""
    rng = np.random.default_rng(17 + seeds)
    folds, studies, ratio = 10, 2000, 1 / 8
    draws = simulated_studies(rng, studies, seeds, folds, 2.0, 1.0, ratio)
    corrected = naive = 0
    for study in draws:
        d = {(s, f): float(study[s, f]) for s in range(seeds) for f in range(folds)}
        corrected += across_runs(d, fold_ratio=ratio)["p_value"] < 0.05
        naive += stats.ttest_1samp(study.ravel(), 0).pvalue < 0.05
    assert corrected / studies <= 0.07
    assert naive / studies > 0.15
    effect = 2 * math.sqrt(2.0**2 + 1.0**2)
    alternative = simulated_studies(rng, 200, seeds, folds, 2.0, 1.0, ratio, true=effect)
    found = sum(
        across_runs(
            {(s, f): float(x[s, f]) for s in range(seeds) for f in range(folds)}, fold_ratio=ratio
        )["p_value"]
        < 0.05
        for x in alternative
    )
    assert found / 200 > 0.75


# exact p-values


def test_the_exact_sign_flip_p_is_scipys_binomial_test_on_paired_binary_outcomes():
    for b, c in [(0, 1), (1, 1), (10, 2), (10, 24), (3, 30), (150, 170), (600, 650)]:
        assert sign_flip_p([1] * c + [-1] * b) == pytest.approx(
            stats.binomtest(c, b + c, 0.5).pvalue, rel=1e-9
        )
    # and the permutation test over images with one seed gives exactly that p
    ref = [trial([i < 24 or 34 <= i < 44 for i in range(300)])]  # b = 10 only the reference
    oth = [trial([i < 34 for i in range(300)])]  # c = 10 + ... see below
    r = paired_comparison(ref, oth)
    b = sum(1 for i in range(300) if (i < 24 or 34 <= i < 44) and not i < 34)
    c = sum(1 for i in range(300) if i < 34 and not (i < 24 or 34 <= i < 44))
    assert r["p_value"] == pytest.approx(stats.binomtest(c, b + c, 0.5).pvalue)


def test_the_exact_sign_flip_p_equals_brute_force_enumeration():
    rng = np.random.default_rng(5)
    for _ in range(20):
        values = rng.integers(-4, 5, size=rng.integers(1, 12))
        observed = abs(values.sum())
        signs = np.array(np.meshgrid(*[[-1, 1]] * len(values))).reshape(len(values), -1).T
        brute = float(np.mean(np.abs(signs @ np.abs(values)) >= observed))
        assert sign_flip_p(values) == pytest.approx(brute, abs=1e-12)


def test_beyond_the_exact_limit_the_p_value_is_monte_carlo_with_its_error_bound(monkeypatch):
    ref, oth = contradicting_seeds()
    exact = paired_comparison(ref, oth)
    monkeypatch.setattr(statistics, "EXACT_LIMIT", 0)
    estimated = paired_comparison(ref, oth, n_resamples=4000)
    assert exact["p_exact"] and not estimated["p_exact"]
    error = estimated["p_error"]
    p = estimated["p_value"]
    assert error == pytest.approx(1.96 * math.sqrt(p * (1 - p) / 4000))
    assert abs(p - exact["p_value"]) <= error + 1 / 4001
    assert f"within ±{error:.4f} (95%)" in estimated["method"]


# contrasts of several cells


def test_an_interaction_is_the_difference_of_two_differences_per_image_and_per_run():
    """2x2 design on 100 images, two seeds: joint loss gains 10 images without PSA and 30 with
    it; the interaction (psa_joint - psa) - (joint - basic) is +20 points."""

    def cell(right, seed):
        return trial([i < right for i in range(100)], seed=seed)

    cells = {
        "basic": [cell(50, s) for s in (0, 1)],
        "joint": [cell(60, s) for s in (0, 1)],
        "psa": [cell(55, s) for s in (0, 1)],
        "psa_joint": [cell(85, s) for s in (0, 1)],
    }
    weights = {"psa_joint": 1, "basic": 1, "psa": -1, "joint": -1}
    r = on_test_set(cells, weights)
    assert r["difference"] == pytest.approx(20.0)
    # per image the contrast is hit(psa_joint) + hit(basic) - hit(psa) - hit(joint): +1 on
    # images 60-84 except 55-59 where psa gains and joint does not: 55..59 -> 0 - 1 + ... below
    d = [int(i < 85) + int(i < 50) - int(i < 55) - int(i < 60) for i in range(100)]
    assert sum(d) == 20 and r["n_changed"] == sum(1 for x in d if x)
    assert r["p_value"] == pytest.approx(sign_flip_p(d))
    assert run_differences(cells, weights) == {(0, 0): 20.0, (1, 0): 20.0}
    swapped = on_test_set(cells, {k: -w for k, w in weights.items()})
    assert swapped["difference"] == pytest.approx(-20.0) and swapped["p_value"] == r["p_value"]
    assert compare(cells, weights)["runs"]["difference"] == pytest.approx(20.0)
    for bad in (
        {"psa": 1},
        {"psa": 1, "basic": 1},
        {"psa": 2, "basic": -2},
        {"psa": 1, "basic": -1, "joint": -1},
    ):
        with pytest.raises(ValueError, match="as many of each"):
            on_test_set(cells, bad)


@pytest.mark.parametrize(("seeds", "power"), [(3, 0.63), (5, 0.69)])
def test_the_runs_floor_takes_the_observed_spread_for_the_true_one_as_its_legend_says(seeds, power):
    """Power at the printed runs MDE, averaged over studies whose spread is drawn: below 80%
    by as much as the legend states, because a few seeds' SD is as often below the truth."""
    rng = np.random.default_rng(3)
    sds = rng.normal(0, 1, size=(20_000, seeds)).std(axis=1, ddof=1)
    mde = np.array([minimum_detectable_runs_difference(sd, seeds) for sd in sds])
    ncp, crit = mde * math.sqrt(seeds), stats.t.ppf(1 - ALPHA / 2, seeds - 1)
    found = stats.nct.sf(crit, seeds - 1, ncp) + np.nan_to_num(stats.nct.cdf(-crit, seeds - 1, ncp))
    assert found.mean() == pytest.approx(power, abs=0.01)
    share = significant_share(seeds)  # what the legend prints for the runs column
    assert share == pytest.approx(
        crit / (minimum_detectable_runs_difference(1.0, seeds) / math.sqrt(1 / seeds))
    )


# the corrected k-fold test's level at fold correlations other than the one it assumes: the
# fold means correlate at rho (a component shared by every fold, variance rho / (1 - rho) of a
# fold's own); Nadeau and Bengio's correction with ratio 1/8 assumes rho = 1/9
LEVELS = {0.0: 0.008, 1 / 9: 0.05, 0.25: 0.13, 0.35: 0.21}  # docs/report.md: one k-fold split


@pytest.mark.parametrize("rho", list(LEVELS))
def test_one_k_fold_split_holds_its_level_only_at_the_fold_correlation_it_assumes(rho):
    rng = np.random.default_rng(int(rho * 1000))
    studies, folds, ratio = 20_000, 10, 1 / 8
    shared = rng.normal(0, math.sqrt(rho / (1 - rho)), size=(studies, 1))
    means = shared + rng.normal(0, 1, size=(studies, folds))
    sd = means.std(axis=1, ddof=1)
    t = means.mean(axis=1) / (sd * math.sqrt(1 / folds + ratio))
    level = float((2 * stats.t.sf(np.abs(t), folds - 1) < ALPHA).mean())
    assert level == pytest.approx(LEVELS[rho], abs=0.01)
    # the report's p at that correlation is the one the test would need there
    d = {(0, f): float(x) for f, x in enumerate(means[0])}
    at = across_runs(d, fold_ratio=ratio)["p_by_correlation"]
    assert at[1 / 9] == pytest.approx(across_runs(d, fold_ratio=ratio)["p_value"])
    assert set(at) == {0.0, 1 / 9, 0.25}
