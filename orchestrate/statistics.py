"""Which ablation gains are real: paired tests of one cell against the reference cell.

Gu & Jin (2025) report ablation gains of 0.6 to 4 points, each measured once on a test set of a
few hundred images. Whether such a gain is a property of the model or of one training run on one
split is a statistical question, and this module answers it from the trials' test predictions
alone (pure numpy/scipy; nothing here knows of Ray or MLflow).

**The test image is the unit of analysis.** Two cells are compared on the same test images, so the
comparison is paired: an image that is hard for one cell tends to be hard for the other, and
pairing removes that shared difficulty from the noise. Trials are paired by (seed, fold) and
images within a pair by id. Every image gets its correctness in each cell averaged over the seeds
in which it was tested (on k-fold CV an image sits in one fold; on a fixed split it is tested once
per seed), and the per-image difference ``d_i = acc_other(i) - acc_reference(i)`` is the datum.
Averaging over seeds first, rather than counting every (seed, image) as a separate observation,
matters: the seeds of one image are strongly correlated (the same face, the same label, mostly
the same prediction), and treating them as independent would shrink the standard error by up to
the square root of the number of seeds, and the p-values with it, without any new evidence.
Resampling or sign-flipping whole images keeps each image's seeds together.

**Test: a paired sign-flip permutation test of the mean of d_i.** Under the null hypothesis that
the two cells are exchangeable on every image, each d_i is as likely to be +|d_i| as -|d_i|;
flipping the signs independently gives the null distribution of the mean difference
(``scipy.stats.permutation_test`` with ``permutation_type='samples'`` on the one sample of
differences). It makes no normality assumption, which matters because the d_i are a handful of
discrete values, mostly zero. Images with d_i = 0 cannot change sign and so do not change the
distribution; they are left out of the permutation step (the statistic still divides by the
number of all images), which makes the test exact whenever ``2**(nonzero images) <=
n_resamples``; otherwise it uses ``n_resamples`` random sign vectors, and scipy's p-value then
counts the observed statistic as one of the resamples, so it is never 0. With one seed and one
fold, every d_i is -1, 0 or +1 and the exact sign-flip test *is* McNemar's exact test (McNemar,
1947): the binomial distribution of the discordant images.

**McNemar's test, the classic view.** ``mcnemar_p`` is McNemar's (1947) exact test, a two-sided
binomial test (``scipy.stats.binomtest``, p = 1/2) on the discordant counts b (only the reference
is right) and c (only the other cell is right). It is reported only when the comparison has
exactly one (seed, fold) pair, where it is valid and familiar; with several seeds the pooled
discordant counts would count one image several times as independent evidence, so it is NaN
there and the permutation test is the one to read.

**Confidence interval: percentile bootstrap over images.** ``scipy.stats.bootstrap`` resamples
the images (each with its seed-averaged d_i) with replacement, ``n_resamples`` times, and takes
the 2.5% and 97.5% percentiles of the mean difference. The percentile method was chosen over BCa
because the statistic is a mean over hundreds of images (nearly normal and unbiased, so BCa's
bias and acceleration corrections are negligible) and it needs no jackknife (BCa's adds n more
evaluations of the statistic and turns NaN on the near-degenerate data of two almost identical
cells). The CI describes the size of the gain; the p-value is the significance decision, and the
two can disagree at the margin.

**Several cells against one reference: Holm's step-down correction.** A study compares every
ablation cell with the same reference, so some small p-values are expected by chance alone.
``holm`` adjusts them by Holm's (1979) sequentially rejective procedure, which controls the
family-wise error rate like Bonferroni under any dependence between the tests (the comparisons
share the reference cell, so they are dependent) while rejecting at least as much as Bonferroni.

**Several trials of one cell: Student's t.** ``summarize_accuracies`` is the unpaired, per-cell
view (the mean accuracy over seeds and folds, its standard deviation and a 95% t interval of the
mean). It says how much a cell's accuracy moves from run to run, not whether two cells differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
# sign vectors (or bootstrap resamples) evaluated per vectorised call: bounds memory to
# BATCH x images floats while keeping the loop in numpy
BATCH = 1000


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
    """One trial's test-set predictions: image ids, true labels and predicted labels."""

    seed: int
    fold: int
    ids: list[str]
    labels: list[int]
    predictions: list[int]

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.labels) == len(self.predictions):
            raise ValueError(
                f"Predictions(seed={self.seed}, fold={self.fold}): ids, labels and predictions "
                f"differ in length ({len(self.ids)}, {len(self.labels)}, "
                f"{len(self.predictions)})"
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


def _per_image_correctness(
    reference: Sequence[Predictions], other: Sequence[Predictions]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Seed-averaged correctness of every shared test image in each cell, and the pair count."""
    ref, oth = _by_trial(reference, "reference"), _by_trial(other, "other")
    pairs = sorted(ref.keys() & oth.keys())
    if not pairs:
        raise ValueError(
            "the two cells share no (seed, fold) trial: reference has "
            f"{sorted(ref)}, other has {sorted(oth)}"
        )
    label_of: dict[str, int] = {}
    # id -> [reference right, other right, times tested]; dicts keep first-seen order
    tally: dict[str, list[int]] = {}
    for seed, fold in pairs:
        r, o = ref[seed, fold], oth[seed, fold]
        o_index = {image: k for k, image in enumerate(o.ids)}
        shared = 0
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
            counts = tally.setdefault(image, [0, 0, 0])
            counts[0] += int(r.predictions[k]) == label
            counts[1] += int(o.predictions[j]) == label
            counts[2] += 1
        if not shared:
            raise ValueError(
                f"trial seed={seed}, fold={fold}: the two cells share no test image id"
            )
    counts = np.array(list(tally.values()), dtype=float)
    return counts[:, 0] / counts[:, 2], counts[:, 1] / counts[:, 2], len(pairs)


def _mean_over(n: int):
    """Statistic for the sign-flip test: the sum of the (nonzero) d_i over all n images."""

    def statistic(x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sum(x, axis=axis) / n

    return statistic


def paired_comparison(
    reference: list[Predictions],
    other: list[Predictions],
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Compare two cells on their shared test images (see the module docstring).

    Returns, with accuracies and differences in percentage points (other minus reference):
    ``difference``, its 95% percentile-bootstrap ``ci_low``/``ci_high``, the two-sided sign-flip
    permutation ``p_value``, ``mcnemar_p`` (NaN unless there is exactly one (seed, fold) pair),
    ``n_images``, ``n_pairs``, ``method``, and for reading the result ``reference_accuracy``,
    ``other_accuracy`` (seed-averaged, on the shared images), ``n_changed`` (images whose d_i
    is nonzero) and ``p_exact`` (whether the permutation p-value is exact).
    Deterministic for a given ``seed``.
    """
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    n_resamples = int(n_resamples)
    ref_acc, oth_acc, n_pairs = _per_image_correctness(reference, other)
    d = oth_acc - ref_acc
    n = int(d.size)
    boot_rng, perm_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    # multiply before dividing so that whole-image gains come out exact (45 of 300 -> 15.0)
    difference = 100.0 * float(d.sum()) / n

    if np.all(d == d[0]):
        # every resample has the same mean: the interval is that point (scipy would warn, NaN)
        ci_low = ci_high = difference
    else:
        boot = stats.bootstrap(
            (d,),
            np.mean,
            n_resamples=n_resamples,
            batch=BATCH,
            vectorized=True,
            confidence_level=CONFIDENCE,
            method="percentile",
            rng=boot_rng,
        )
        ci_low = 100.0 * float(boot.confidence_interval.low)
        ci_high = 100.0 * float(boot.confidence_interval.high)

    changed = d[d != 0]
    p_exact = 2**changed.size <= n_resamples
    if changed.size < 2:
        # no changed image, or one: both signs give the same |mean|, so the two-sided p is 1
        # (scipy's permutation_test also needs two observations)
        p_value, p_exact = 1.0, True
    else:
        perm = stats.permutation_test(
            (changed,),
            _mean_over(n),
            permutation_type="samples",
            vectorized=True,
            n_resamples=n_resamples,
            batch=BATCH,
            alternative="two-sided",
            rng=perm_rng,
        )
        p_value = float(perm.pvalue)

    mcnemar_p = math.nan
    if n_pairs == 1:
        # one trial per cell: every d_i is -1, 0 or +1
        b = int(np.sum(d < 0))  # only the reference is right
        c = int(np.sum(d > 0))  # only the other cell is right
        mcnemar_p = 1.0 if b + c == 0 else float(stats.binomtest(c, b + c, 0.5).pvalue)

    flips = "exact" if p_exact else f"{n_resamples} random sign vectors"
    method = (
        f"paired sign-flip permutation test over test images (scipy.stats.permutation_test, "
        f"{flips}); 95% CI: percentile bootstrap over images ({n_resamples} resamples)"
    )
    if n_pairs == 1:
        method += "; McNemar's exact test (scipy.stats.binomtest) on the discordant images"
    return {
        "difference": difference,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": p_value,
        "mcnemar_p": mcnemar_p,
        "n_images": n,
        "n_pairs": n_pairs,
        "n_changed": int(changed.size),
        "p_exact": bool(p_exact),
        "reference_accuracy": 100.0 * float(ref_acc.sum()) / n,
        "other_accuracy": 100.0 * float(oth_acc.sum()) / n,
        "method": method,
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
