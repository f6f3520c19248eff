"""Which ablation gains are real: two paired questions about one cell against the reference cell.

Gu & Jin (2025) report ablation gains of 0.6 to 4 points, each measured once on a test set of a
few hundred images. "Is the gain real?" is two different questions, and this module answers them
separately, from the trials' test predictions alone (pure numpy/scipy; nothing here knows of Ray
or MLflow):

1. **On this test set** (``paired_comparison``): do *these trained models* of the two cells differ
   on *these test images*? The noise is which images each cell happens to get right.
2. **Across training runs** (``run_comparison``): does the gain survive another training seed
   (and fold)? The noise is how much a run's accuracy moves when the seed changes, which is what
   "does attention X help" asks. A gain can be certain on one test set and not reproduce: one
   lucky seed is enough to make question 1 significant.

Each comes with its noise floor (``testset_mde``, ``runs_mde``, ``seeds_needed``): the smallest
difference the test detects with 80% power at two-sided alpha 0.05, and for question 2 how many
seeds would detect the difference observed.

**Question 1: the independent unit is resampled, not the image.** Two cells are compared on the
same test images, so the comparison is paired. Trials are paired by (seed, fold) and images within
a pair by id. Every image gets its correctness in each cell averaged over the seeds in which it was
tested (on k-fold CV an image sits in one fold; on a fixed split it is tested once per seed), and
``d_i = acc_other(i) - acc_reference(i)`` is the per-image datum; the seeds of one image are not
independent evidence (the same face, the same label, mostly the same prediction). Images are not
independent either when they share a subject: the three frames of a CK+ sequence and the sequences
of one person succeed or fail together. A trial's predictions may therefore name each image's
*group* (``Predictions.groups``: the subject on CK+ and the synthetic set; absent or None on
FER2013, where the image is its own unit). The unit g is the group, or the image where there is
none, and its datum is the **sum** ``U_g`` of its images' d_i, so that the statistic
``sum_g U_g / N`` (N images) is exactly the image-level mean difference, each image weighing the
same whatever its subject's size:

- *test*: a two-sided sign-flip permutation test over units (``scipy.stats.permutation_test``,
  ``permutation_type='samples'``): under the null hypothesis that the two cells are exchangeable
  within every unit, each U_g is as likely to be +|U_g| as -|U_g|. Units with U_g = 0 cannot change
  the distribution and are left out of the permutation step (the statistic still divides by all N),
  which makes the test exact whenever ``2**(changed units) <= n_resamples``; otherwise scipy counts
  the observed statistic as one of the random resamples, so p is never 0. With one seed, one fold
  and images as units every d_i is -1, 0 or +1 and the exact test *is* McNemar's (1947) exact test,
  reported as ``mcnemar_p`` in that setting only (``scipy.stats.binomtest`` on the discordant
  counts; NaN with several seeds, whose pooled counts are not independent, or with groups);
- *interval*: a percentile bootstrap over units (``scipy.stats.bootstrap``, ``paired=True`` over
  (U_g, images in g)): resample units with replacement, take the ratio ``sum U* / sum n*``; with
  groups this is the cluster bootstrap. Percentile rather than BCa: the statistic is a smooth mean
  over many units, and BCa's jackknife turns NaN on two nearly identical cells. When every unit
  has the same mean difference (identical cells, or a single unit) the interval is that point.
  With a handful of subjects the cluster bootstrap is rough (it undercovers); read the p-value.
- *noise floor*: ``mde = (z_{1-alpha/2} + z_{power}) * sqrt(sum_g U_g**2) / N``, with z the
  standard normal quantiles (1.960 + 0.842). ``sqrt(sum U_g**2) / N`` is the standard deviation of
  the sign-flip statistic's null distribution, so this is the normal approximation of that test.
  With one seed and images as units, sum d_i**2 is the number of discordant images and the formula
  is the paired-proportions (McNemar) normal approximation with the observed discordance
  ``p_disc = (b + c) / N``: ``mde = (z_{1-alpha/2} + z_{power}) * sqrt(p_disc / N)`` (Connor's
  1987 formula with the observed discordance under both hypotheses). It is an approximation: the
  exact test, being discrete, has a little less power there (about 0.77 for a few hundred
  images). With clustered units the same N images count as fewer, larger units, and the floor
  rises. NaN when no unit changed (no observed spread to scale by).

**Question 2: the (seed, fold) run is the unit.** ``run_accuracies`` gives every trial of the two
cells its accuracy on the images the paired trials share; ``run_comparison`` takes the paired
differences ``D_k = acc_other(k) - acc_reference(k)`` over the K (seed, fold) pairs:

- *test*: the paired t-test (``scipy.stats.ttest_1samp`` on D, equivalently ``ttest_rel``) and
  its 95% Student-t interval of the mean of D. Chosen over the exact sign-flip or Wilcoxon
  signed-rank tests because with the usual 3 to 5 seeds those cannot reach 0.05 at all (their
  smallest two-sided p is 2 / 2**K = 0.0625 at K = 5), so they could never call a gain
  reproducible; a run's accuracy is a mean over hundreds of test images, so D is close to normal,
  which is what the t-test assumes. When every D_k is the same the t statistic is undefined: the
  p-value is then the exact sign-flip one (2 / 2**K, or 1 when D = 0) and the interval that point.
- with fewer than two paired runs (one seed and one fold) there is no run-to-run spread: nothing
  is tested and the table says ``n/a: 1 seed x 1 fold``.
- *noise floor*: ``mde = (t_{1-alpha/2, K-1} + t_{power, K-1}) * s / sqrt(K)`` with s the sample
  standard deviation of D and t Student's quantiles: the usual approximation of the paired
  t-test's power (the noncentral t replaced by a shifted central t). It is slightly optimistic for
  very few runs (the true power at this mde is 0.73 for K = 2, 0.77 for K = 3, >= 0.78 from
  K = 4). ``runs_needed`` is the smallest K' >= 2 whose mde with the same s is at most |mean D|,
  and ``seeds_needed`` is ``ceil(K' / folds)`` with the folds of this study per seed (each seed
  adds one run per fold). NaN when s = 0 or K < 2; infinite when mean D = 0 (or more than a
  million runs would be needed).

**Several cells against one reference: Holm's step-down correction.** A study compares every
ablation cell with the same reference, so some small p-values are expected by chance alone.
``holm`` adjusts them by Holm's (1979) sequentially rejective procedure, which controls the
family-wise error rate like Bonferroni under any dependence between the tests (the comparisons
share the reference cell) while rejecting at least as much as Bonferroni. Each question's p-values
are adjusted across cells separately (the report does this).

**Several trials of one cell: Student's t.** ``summarize_accuracies`` is the unpaired, per-cell
view (the mean accuracy over seeds and folds, its standard deviation and a 95% t interval of the
mean). It says how much a cell's accuracy moves from run to run, not whether two cells differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05  # two-sided level of the noise floors (the report's significance level too)
POWER = 0.80
# sign vectors (or bootstrap resamples) evaluated per vectorised call: bounds memory to
# BATCH x units floats while keeping the loop in numpy
BATCH = 1000
# runs_needed is searched up to here; beyond it the observed difference is as good as none
MAX_RUNS = 1_000_000


def summarize_accuracies(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (ddof=1) and 95% Student-t CI of the mean of ``values``.

    Values are in whatever unit they are given (the report passes percent). With fewer than two
    values the standard deviation and the interval are NaN; with no values the mean is NaN too.
    """
    x = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError(f"summarize_accuracies: values must be finite, got {list(values)}")
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


@dataclass
class Predictions:
    """One trial's test-set predictions: image ids, true labels and predicted labels, and
    optionally each image's group (its subject: the independent unit), None where it has none."""

    seed: int
    fold: int
    ids: list[str]
    labels: list[int]
    predictions: list[int]
    groups: list[str | None] | None = None

    def __post_init__(self) -> None:
        lengths = [len(self.ids), len(self.labels), len(self.predictions)]
        if self.groups is not None:
            lengths.append(len(self.groups))
        if len(set(lengths)) != 1:
            raise ValueError(
                f"Predictions(seed={self.seed}, fold={self.fold}): ids, labels, predictions"
                f"{' and groups' if self.groups is not None else ''} differ in length "
                f"({', '.join(map(str, lengths))})"
            )
        seen: set[str] = set()
        for image in self.ids:
            if image in seen:
                raise ValueError(
                    f"Predictions(seed={self.seed}, fold={self.fold}): image id {image!r} "
                    "appears more than once"
                )
            seen.add(image)


def _by_trial(cell: Sequence[Predictions], name: str) -> dict[tuple[int, int], Predictions]:
    trials: dict[tuple[int, int], Predictions] = {}
    for trial in cell:
        key = (int(trial.seed), int(trial.fold))
        if key in trials:
            raise ValueError(f"{name}: two trials with seed={key[0]}, fold={key[1]}")
        trials[key] = trial
    return trials


@dataclass
class _Paired:
    """Two cells on their shared test images: per image (first-seen order) the seed-averaged
    correctness in each cell and the unit it belongs to; per (seed, fold) pair both accuracies."""

    reference: np.ndarray
    other: np.ndarray
    unit: np.ndarray  # unit index of every image
    grouped: np.ndarray  # whether the image's unit is a named group (else the image itself)
    pairs: list[tuple[int, int]]
    run_reference: dict[tuple[int, int], float]  # percent, on the images the pair shares
    run_other: dict[tuple[int, int], float]


def _pair(reference: Sequence[Predictions], other: Sequence[Predictions]) -> _Paired:
    ref, oth = _by_trial(reference, "reference"), _by_trial(other, "other")
    pairs = sorted(ref.keys() & oth.keys())
    if not pairs:
        raise ValueError(
            "the two cells share no (seed, fold) trial: reference has "
            f"{sorted(ref)}, other has {sorted(oth)}"
        )
    label_of: dict[str, int] = {}
    group_of: dict[str, str] = {}
    # id -> [reference right, other right, times tested]; dicts keep first-seen order
    tally: dict[str, list[int]] = {}
    run_ref: dict[tuple[int, int], float] = {}
    run_oth: dict[tuple[int, int], float] = {}
    for seed, fold in pairs:
        r, o = ref[seed, fold], oth[seed, fold]
        o_index = {image: k for k, image in enumerate(o.ids)}
        shared = right_r = right_o = 0
        for k, image in enumerate(r.ids):
            j = o_index.get(image)
            if j is None:
                continue
            shared += 1
            label = int(r.labels[k])
            if int(o.labels[j]) != label:
                raise ValueError(
                    f"image id {image!r} (seed={seed}, fold={fold}) has label {label} in the "
                    f"reference cell but {int(o.labels[j])} in the other"
                )
            if label_of.setdefault(image, label) != label:
                raise ValueError(
                    f"image id {image!r} has label {label_of[image]} in one trial but {label} "
                    f"in seed={seed}, fold={fold}"
                )
            # a trial without groups (an older artifact) leaves the image's group to the others
            for trial, index in ((r, k), (o, j)):
                group = None if trial.groups is None else trial.groups[index]
                if group is None:
                    continue
                if group_of.setdefault(image, str(group)) != str(group):
                    raise ValueError(
                        f"image id {image!r} is in group {group_of[image]!r} in one trial but "
                        f"{str(group)!r} in seed={seed}, fold={fold}"
                    )
            hit_r = int(r.predictions[k]) == label
            hit_o = int(o.predictions[j]) == label
            right_r, right_o = right_r + hit_r, right_o + hit_o
            counts = tally.setdefault(image, [0, 0, 0])
            counts[0] += hit_r
            counts[1] += hit_o
            counts[2] += 1
        if not shared:
            raise ValueError(
                f"trial seed={seed}, fold={fold}: the two cells share no test image id"
            )
        run_ref[seed, fold] = 100.0 * right_r / shared
        run_oth[seed, fold] = 100.0 * right_o / shared
    counts = np.array(list(tally.values()), dtype=float)
    # an image's unit: its group, or itself; the tuple keeps a group named like an image apart
    keys = [("group", group_of[i]) if i in group_of else ("image", i) for i in tally]
    index: dict[tuple[str, str], int] = {}
    unit = np.array([index.setdefault(key, len(index)) for key in keys], dtype=int)
    grouped = np.array([key[0] == "group" for key in keys], dtype=bool)
    return _Paired(
        counts[:, 0] / counts[:, 2], counts[:, 1] / counts[:, 2], unit, grouped, pairs,
        run_ref, run_oth,
    )  # fmt: skip


def _sum_over(n: int):
    """Statistic for the sign-flip test: the sum of the (nonzero) unit sums over all n images."""

    def statistic(x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sum(x, axis=axis) / n

    return statistic


def _ratio(u: np.ndarray, m: np.ndarray, axis: int = -1) -> np.ndarray:
    """Statistic for the (cluster) bootstrap: the image-level mean of resampled units."""
    return np.sum(u, axis=axis) / np.sum(m, axis=axis)


def _z_sum() -> float:
    return float(stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER))


def paired_comparison(
    reference: list[Predictions],
    other: list[Predictions],
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Question 1, "on this test set": compare two cells on their shared test images,
    resampling the independent unit (see the module docstring).

    Returns, with accuracies and differences in percentage points (other minus reference):
    ``difference``, its 95% percentile-bootstrap ``ci_low``/``ci_high`` over units, the
    two-sided sign-flip permutation ``p_value`` over units, ``mcnemar_p`` (NaN unless there is
    exactly one (seed, fold) pair and every unit is one image), ``mde`` (the smallest difference
    detectable with 80% power at two-sided 0.05), ``unit`` ("subject", "image", or "subject or
    image" when only some images name a group), ``n_units``, ``n_images``, ``n_pairs``,
    ``method``, and for reading the result ``reference_accuracy``, ``other_accuracy``
    (seed-averaged, on the shared images), ``n_changed`` (images whose d_i is nonzero),
    ``n_units_changed`` and ``p_exact`` (whether the permutation p-value is exact).
    Deterministic for a given ``seed``.
    """
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    n_resamples = int(n_resamples)
    paired = _pair(reference, other)
    d = paired.other - paired.reference
    n = int(d.size)
    n_pairs = len(paired.pairs)
    u = np.bincount(paired.unit, weights=d)  # per unit: the sum of its images' d_i
    m = np.bincount(paired.unit).astype(float)  # per unit: its images
    g = int(u.size)
    boot_rng, perm_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    # multiply before dividing so that whole-image gains come out exact (45 of 300 -> 15.0)
    difference = 100.0 * float(d.sum()) / n

    means = u / m
    if np.all(means == means[0]):
        # every resample has the same mean: the interval is that point (scipy would warn, NaN)
        ci_low = ci_high = difference
    else:
        boot = stats.bootstrap(
            (u, m),
            _ratio,
            paired=True,
            n_resamples=n_resamples,
            batch=BATCH,
            vectorized=True,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=boot_rng,
        )
        ci_low = 100.0 * float(boot.confidence_interval.low)
        ci_high = 100.0 * float(boot.confidence_interval.high)

    changed = u[u != 0]
    p_exact = 2**changed.size <= n_resamples
    if changed.size < 2:
        # no changed unit, or one: both signs give the same |mean|, so the two-sided p is 1
        # (scipy's permutation_test also needs two observations)
        p_value, p_exact = 1.0, True
    else:
        perm = stats.permutation_test(
            (changed,),
            _sum_over(n),
            permutation_type="samples",
            vectorized=True,
            n_resamples=n_resamples,
            batch=BATCH,
            alternative="two-sided",
            rng=perm_rng,
        )
        p_value = float(perm.pvalue)

    spread = math.sqrt(float(np.sum(u**2)))
    mde = 100.0 * _z_sum() * spread / n if spread > 0 else math.nan

    images_are_units = g == n
    mcnemar_p = math.nan
    if n_pairs == 1 and images_are_units:
        # one trial per cell, every image its own unit: every d_i is -1, 0 or +1
        b = int(np.sum(d < 0))  # only the reference is right
        c = int(np.sum(d > 0))  # only the other cell is right
        mcnemar_p = 1.0 if b + c == 0 else float(stats.binomtest(c, b + c, 0.5).pvalue)

    if paired.grouped.all():
        unit = "subject"
    elif paired.grouped.any():
        unit = "subject or image"
    else:
        unit = "image"
    units = f"{unit}s" if unit != "subject or image" else "subjects (images without one)"
    flips = "exact" if p_exact else f"{n_resamples} random sign vectors"
    resampler = "cluster bootstrap (percentile)" if paired.grouped.any() else "percentile bootstrap"
    method = (
        f"on this test set: paired sign-flip permutation test over {units} "
        f"(scipy.stats.permutation_test, {flips}); 95% CI: {resampler} over {units} "
        f"({n_resamples} resamples)"
    )
    if not math.isnan(mcnemar_p):
        method += "; McNemar's exact test (scipy.stats.binomtest) on the discordant images"
    return {
        "difference": difference,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": p_value,
        "mcnemar_p": mcnemar_p,
        "mde": mde,
        "unit": unit,
        "n_units": g,
        "n_images": n,
        "n_pairs": n_pairs,
        "n_changed": int(np.sum(d != 0)),
        "n_units_changed": int(changed.size),
        "p_exact": bool(p_exact),
        "reference_accuracy": 100.0 * float(paired.reference.sum()) / n,
        "other_accuracy": 100.0 * float(paired.other.sum()) / n,
        "method": method,
    }


def run_accuracies(
    reference: list[Predictions], other: list[Predictions]
) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float]]:
    """Each paired trial's test accuracy (percent) on the images it shares with its partner in
    the other cell, keyed by (seed, fold): the input of ``run_comparison``."""
    paired = _pair(reference, other)
    return paired.run_reference, paired.run_other


def minimum_detectable_runs_difference(sd: float, runs: int) -> float:
    """The smallest mean paired difference a two-sided paired t-test over ``runs`` paired runs
    detects with 80% power at alpha 0.05, given the run-to-run SD ``sd`` of the differences:
    ``(t_{1-alpha/2, K-1} + t_{power, K-1}) * sd / sqrt(K)`` (shifted central t). NaN for K < 2."""
    if runs < 2 or not sd > 0:
        return math.nan
    df = runs - 1
    quantiles = float(stats.t.ppf(1 - ALPHA / 2, df) + stats.t.ppf(POWER, df))
    return quantiles * sd / math.sqrt(runs)


def runs_needed(difference: float, sd: float) -> float:
    """The smallest number K >= 2 of paired runs whose ``minimum_detectable_runs_difference``
    with this ``sd`` is at most ``|difference|``; inf when none up to a million is, NaN when
    ``sd`` is not positive."""
    if not sd > 0 or math.isnan(difference):
        return math.nan
    if difference == 0:
        return math.inf
    # the normal quantiles are below the t ones, so this is a lower bound: step up from it
    lower = (_z_sum() * sd / abs(difference)) ** 2
    if lower > MAX_RUNS:
        return math.inf
    k = max(2, math.floor(lower))
    while minimum_detectable_runs_difference(sd, k) > abs(difference):
        k += 1
        if k > MAX_RUNS:
            return math.inf
    return float(k)


def run_comparison(
    reference: Mapping[tuple[int, int], float], other: Mapping[tuple[int, int], float]
) -> dict:
    """Question 2, "across training runs": a paired t-test over the (seed, fold) runs that both
    cells have (accuracies in percent, keyed by (seed, fold); see the module docstring).

    Returns ``n_runs`` (K), ``n_seeds``, ``n_folds``, ``difference`` (mean of D = other minus
    reference), ``sd`` (sample SD of D), ``ci_low``/``ci_high`` (95% t interval of the mean),
    ``p_value``, ``judged`` (False below two paired runs: then p, the interval, ``sd`` and the
    noise floor are NaN and ``note`` says why, "n/a: 1 seed x 1 fold"), ``mde`` (smallest mean
    difference detectable with 80% power at two-sided 0.05), ``runs_needed`` and ``seeds_needed``
    (to detect the observed difference with 80% power given ``sd``), ``note`` and ``method``.
    """
    keys = sorted(set(reference) & set(other))
    diffs = np.array([float(other[k]) - float(reference[k]) for k in keys], dtype=float)
    if not np.all(np.isfinite(diffs)):
        raise ValueError(f"run_comparison: accuracies must be finite, got differences {diffs}")
    k = len(keys)
    seeds, folds = len({s for s, _ in keys}), len({f for _, f in keys})
    mean = float(diffs.mean()) if k else math.nan
    result = {
        "n_runs": k, "n_seeds": seeds, "n_folds": folds, "difference": mean, "sd": math.nan,
        "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "judged": False,
        "mde": math.nan, "runs_needed": math.nan, "seeds_needed": math.nan,
        "note": "", "method": "across training runs: paired t-test over (seed, fold) runs "
        "(scipy.stats.ttest_1samp on the paired differences), 95% t interval",
    }  # fmt: skip
    if k < 2:
        # one (seed, fold) pair: no run-to-run spread to test against
        result["note"] = "n/a: 1 seed x 1 fold" if k else "n/a: no paired runs"
        return result
    sd = float(diffs.std(ddof=1))
    if sd == 0:
        # the t statistic is 0/0 or x/0: fall back on the exact sign-flip p-value
        p = 1.0 if mean == 0 else min(1.0, 2.0 / 2**k)
        low = high = mean
        result["method"] += "; identical differences: exact sign-flip p-value"
    else:
        test = stats.ttest_1samp(diffs, 0.0)
        p = float(test.pvalue)
        ci = test.confidence_interval(CONFIDENCE)
        low, high = float(ci.low), float(ci.high)
    needed = runs_needed(mean, sd)
    result.update(
        sd=sd, ci_low=low, ci_high=high, p_value=p, judged=True,
        mde=minimum_detectable_runs_difference(sd, k), runs_needed=needed,
        seeds_needed=float(math.ceil(needed / folds)) if math.isfinite(needed) else needed,
    )  # fmt: skip
    return result


def compare_cells(
    reference: list[Predictions],
    other: list[Predictions],
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Both questions for one cell against the reference: ``{"test_set": paired_comparison(...),
    "runs": run_comparison(...)}``, the runs' accuracies taken on the shared test images."""
    return {
        "test_set": paired_comparison(reference, other, n_resamples=n_resamples, seed=seed),
        "runs": run_comparison(*run_accuracies(reference, other)),
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the order given.

    The i-th smallest of m p-values is multiplied by m - i + 1, capped at 1, and made monotone
    (never below the adjusted value of a smaller p). NaN marks a comparison that was not made: it
    is returned as NaN and does not count towards m.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    valid = ~np.isnan(p)
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError(f"holm: p-values must lie in [0, 1], got {list(p_values)}")
    adjusted = p.copy()
    where = np.flatnonzero(valid)
    order = where[np.argsort(p[where], kind="stable")]
    m = order.size
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return [float(v) for v in adjusted]
