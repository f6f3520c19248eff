"""Which ablation gains are real: contrasts of cells, each asked two questions, from the
trials' test predictions alone (numpy, scipy, statsmodels; nothing here knows of Ray or MLflow).

A contrast weighs cells +1 / -1, as many of each: ``{basic_psa: +1, basic: -1}``, or a 2x2
design's interaction ``{psa_joint: +1, basic: +1, psa: -1, joint: -1}``.

1. ``on_test_set``: do these trained models differ on these test images? The exact sign-flip
   test over independent units (subjects where images name them, else images), its inversion
   as the interval up to ``INVERT_LIMIT`` units, and its noise floor.
2. ``across_runs``: does the contrast survive another seed (and on k-fold CV another training
   set)? The paired t-test over seeds on a fixed split, the corrected k-fold t-test over folds
   (repeated: over every drawing's folds), and the noncentral-t noise floor.

Families of contrasts are Holm-adjusted (``holm``). docs/report.md explains each method, its
assumption and the levels and coverages measured by simulation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05  # two-sided level of the tests and noise floors
POWER = 0.80
# bootstrap resamples (or Monte Carlo sign vectors) evaluated per vectorised call
BATCH = 1000
# the exact sign-flip distribution costs (changed units) x (their integer sum) additions; beyond
# this many (about a second) the p-value is Monte Carlo, with its error bound
EXACT_LIMIT = 200_000_000
# up to this many units the test-set interval and noise floor come from the sign-flip test
# itself (inverted; its power counted), beyond it from the bootstrap and the normal limit
INVERT_LIMIT = 60
ENUMERATE = 12  # units: up to here every sign vector, beyond it Monte Carlo ones
NOISE_DRAWS = 400  # random outcomes the noise floor's power is counted over
POWER_SIGNS = 1000  # sign vectors each of those outcomes is tested with (beyond ENUMERATE)
# seeds_needed is searched up to here; beyond it the observed difference is as good as none
MAX_SEEDS = 1_000_000
# the smallest observed difference that can be significant, as a share of the test-set MDE
SIGNIFICANT_SHARE = float(
    stats.norm.ppf(1 - ALPHA / 2) / (stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER))
)

# the two questions a contrast answers apart, and the runs question's test on k-fold CV
QUESTIONS = {"testset": "on this test set", "runs": "across training runs"}
KFOLD_TEST = "corrected k-fold t"  # runs_test of the corrected k-fold t-test
REPEATED_TEST = "corrected repeated k-fold t"  # ... and of its repeated k-fold form
# the fold correlations at which one k-fold split's runs p-value is shown besides: the
# corrected test assumes about n_test / n_train (1/9 for 10 folds), which nothing checks
FOLD_CORRELATIONS = (0.0, 1 / 9, 0.25)

Key = tuple[int, int]  # (seed, fold); on repeated k-fold the fold is repetition * k + fold


def _t_half(sd: float, n: int, fold_ratio: float) -> float:
    """Half-width of the 95% t interval of a mean of n values with SD sd, the variance of the
    mean corrected for overlapping training sets by ``fold_ratio`` (0: independent values)."""
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1)) * sd * math.sqrt(1 / n + fold_ratio)


def summarize_accuracies(values: Sequence[float], fold_ratio: float = 0.0) -> dict:
    """Mean, sample standard deviation (ddof=1) and 95% Student-t CI of the mean of ``values``,
    the variance of the mean ``s**2 (1/n + fold_ratio)`` (``fold_ratio`` = n_test / n_train when
    the values are the folds of k-fold CV, else 0).

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
    half = _t_half(std, n, fold_ratio)
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
        if len(set(self.ids)) != len(self.ids):
            image = next(i for k, i in enumerate(self.ids) if i in self.ids[:k])
            raise ValueError(
                f"Predictions(seed={self.seed}, fold={self.fold}): image id {image!r} "
                "appears more than once"
            )


def check_weights(weights: Mapping[str, int]) -> None:
    """A contrast: at least two cells, weights +1 or -1, as many of each (they sum to 0)."""
    values = list(weights.values())
    if len(values) < 2 or any(w not in (1, -1) for w in values) or sum(values) != 0:
        raise ValueError(f"a contrast weighs cells +1 and -1, as many of each; got {dict(weights)}")


def _by_trial(cell: Sequence[Predictions], name: str) -> dict[Key, Predictions]:
    trials: dict[Key, Predictions] = {}
    for trial in cell:
        key = (int(trial.seed), int(trial.fold))
        if key in trials:
            raise ValueError(f"{name}: two trials with seed={key[0]}, fold={key[1]}")
        trials[key] = trial
    return trials


@dataclass
class _Joined:
    """The cells of a contrast on their shared test images: per image (first-seen order) the
    integer sum of the contrast over the times it was tested, that count, each cell's hits, and
    the unit it belongs to; per joined (seed, fold) run each cell's accuracy."""

    numerator: np.ndarray  # int: sum over tests of sum_c w_c hit_c
    count: np.ndarray  # int: times tested
    hits: dict[str, np.ndarray]  # cell -> hits summed over tests
    unit: np.ndarray  # unit index of every image
    grouped: np.ndarray  # whether the image's unit is a named group (else the image itself)
    runs: dict[str, dict[Key, float]]  # cell -> run -> accuracy (percent) on the shared images

    @property
    def d(self) -> np.ndarray:
        return self.numerator / self.count


def _join(cells: Mapping[str, Sequence[Predictions]], weights: Mapping[str, int]) -> _Joined:
    check_weights(weights)
    names = list(weights)
    trials = {name: _by_trial(cells[name], name) for name in names}
    keys = sorted(set.intersection(*(set(t) for t in trials.values())))
    if not keys:
        found = "; ".join(f"{n} has {sorted(t)}" for n, t in trials.items())
        raise ValueError(f"the cells share no (seed, fold) trial: {found}")
    label_of: dict[str, int] = {}
    group_of: dict[str, str] = {}
    # id -> [numerator, count, hits per cell...]; dicts keep first-seen order
    tally: dict[str, list[int]] = {}
    runs: dict[str, dict[Key, float]] = {name: {} for name in names}
    for seed, fold in keys:
        joined = [trials[name][seed, fold] for name in names]
        index = [{image: k for k, image in enumerate(t.ids)} for t in joined]
        shared = [i for i in joined[0].ids if all(i in m for m in index[1:])]
        if not shared:
            raise ValueError(f"trial seed={seed}, fold={fold}: the cells share no test image id")
        right = [0] * len(names)
        for image in shared:
            at = [m[image] for m in index]
            label = int(joined[0].labels[at[0]])
            for name, t, k in zip(names, joined, at, strict=True):
                if int(t.labels[k]) != label:
                    raise ValueError(
                        f"image id {image!r} (seed={seed}, fold={fold}) has label {label} in "
                        f"cell {names[0]} but {int(t.labels[k])} in cell {name}"
                    )
            if label_of.setdefault(image, label) != label:
                raise ValueError(
                    f"image id {image!r} has label {label_of[image]} in one trial but {label} "
                    f"in seed={seed}, fold={fold}"
                )
            # a trial without groups (an older artifact) leaves the image's group to the others
            for t, k in zip(joined, at, strict=True):
                group = None if t.groups is None else t.groups[k]
                if group is not None and group_of.setdefault(image, str(group)) != str(group):
                    raise ValueError(
                        f"image id {image!r} is in group {group_of[image]!r} in one trial but "
                        f"{str(group)!r} in seed={seed}, fold={fold}"
                    )
            counts = tally.setdefault(image, [0] * (2 + len(names)))
            counts[1] += 1
            for c, (name, t, k) in enumerate(zip(names, joined, at, strict=True)):
                hit = int(int(t.predictions[k]) == label)
                right[c] += hit
                counts[2 + c] += hit
                counts[0] += weights[name] * hit
        for c, name in enumerate(names):
            runs[name][seed, fold] = 100.0 * right[c] / len(shared)
    table = np.array(list(tally.values()), dtype=np.int64)
    # an image's unit: its group, or itself; the tuple keeps a group named like an image apart
    unit_keys = [("group", group_of[i]) if i in group_of else ("image", i) for i in tally]
    units: dict[tuple[str, str], int] = {}
    unit = np.array([units.setdefault(key, len(units)) for key in unit_keys], dtype=int)
    grouped = np.array([key[0] == "group" for key in unit_keys], dtype=bool)
    hits = {name: table[:, 2 + c] for c, name in enumerate(names)}
    return _Joined(table[:, 0], table[:, 1], hits, unit, grouped, runs)


def sign_flip_p(values: Sequence[int]) -> float:
    """Exact two-sided p-value of the sign-flip test on integer unit sums: the probability,
    each sign flipped by a fair coin, that ``|sum|`` reaches the observed ``|sum(values)|``.

    The distribution of W = the sum of the |values| that keep a plus sign is built by adding one
    unit's two-point distribution at a time; the statistic is 2W - sum|values|."""
    v = np.asarray(values, dtype=np.int64)
    a = np.abs(v[v != 0])
    total, observed = int(a.sum()), abs(int(v.sum()))
    if a.size == 0:
        return 1.0
    dist = np.zeros(total + 1)
    dist[0] = 1.0
    reach = 0
    for x in a:
        # overlapping slices are safe: numpy buffers ufunc operands that overlap
        dist[x : reach + x + 1] += dist[: reach + 1]
        reach += int(x)
        dist[: reach + 1] *= 0.5
    w = np.arange(total + 1)
    return float(min(1.0, dist[np.abs(2 * w - total) >= observed].sum()))


def _ratio(u: np.ndarray, m: np.ndarray, axis: int = -1) -> np.ndarray:
    """Statistic for the (cluster) bootstrap: the image-level mean of resampled units."""
    return np.sum(u, axis=axis) / np.sum(m, axis=axis)


def _z_sum() -> float:
    return float(stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER))


def _unit_name(grouped: np.ndarray) -> str:
    if grouped.all():
        return "subject"
    return "subject or image" if grouped.any() else "image"


def smallest_p(units: int) -> float:
    """The smallest two-sided p-value a sign-flip test over ``units`` can give: 2 / 2**units."""
    return 2.0 / 2.0**units


def _sign_vectors(g: int, n: int, rng) -> np.ndarray:
    """[S, g] signs: all 2**g of them up to ENUMERATE units, else ``n`` random ones and the
    identity (so that a Monte Carlo p-value is never 0)."""
    if g <= ENUMERATE:
        return ((np.arange(2**g)[:, None] >> np.arange(g)) & 1) * 2.0 - 1.0
    return np.vstack([np.ones(g), rng.choice((-1.0, 1.0), size=(n - 1, g))])


def _flip_p(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """The sign-flip p-value of each row of ``x`` [B, g] under the sign vectors ``signs``."""
    x = np.atleast_2d(x)
    observed = np.abs(x.sum(axis=1))
    flipped = np.abs(signs @ x.T)  # [S, B]
    return (flipped >= observed * (1 - 1e-12) - 1e-12).mean(axis=0)


def _bisect(inside, outside, accepted, tol: float = 1e-7) -> float:
    """The boundary between ``inside`` (where ``accepted``) and ``outside`` (where not)."""
    for _ in range(200):
        if abs(outside - inside) <= tol:
            break
        middle = (inside + outside) / 2
        inside, outside = (middle, outside) if accepted(middle) else (inside, middle)
    return (inside + outside) / 2


def _inverted_interval(u, m, signs) -> tuple[float, float]:
    """The 95% interval (percent) of the image-level difference as the values delta the
    sign-flip test does not reject: the units' ``u - delta * m`` are symmetric about 0 under
    that difference. Needs ``smallest_p(g) < ALPHA``: far enough out every unit has one sign."""
    estimate = float(u.sum() / m.sum())
    means = u / m

    def kept(delta: float) -> bool:
        return float(_flip_p(u - delta * m, signs)[0]) >= ALPHA

    low = _bisect(estimate, float(means.min()) - 1.0, kept)
    high = _bisect(estimate, float(means.max()) + 1.0, kept)
    return 100.0 * low, 100.0 * high


def _sign_flip_mde(u, m, signs, noise) -> float:
    """The true difference (percent) the sign-flip test over these units detects with POWER:
    each unit a random sign of its observed size ``|u|`` (the spread the test's own null
    distribution has) plus the difference times its images, power counted over the ``noise``
    sign vectors. Exact in its discreteness, where the normal approximation is not: with 6
    units only the all-one-sign outcome reaches p < 0.05. The sizes are scaled to the spread's
    median-unbiased value, sqrt((g - 1) / chi2_0.5(g - 1)) times the observed (1.07 for 6
    units, 1.00 at 60): a few units' spread is more often below the true one than above, and
    unscaled the printed floor was found about 75% of the time, not 80%
    (tests/test_small_test_sets.py)."""
    g = len(u)
    size = np.abs(u) * math.sqrt((g - 1) / stats.chi2.ppf(0.5, g - 1))

    def detected(delta: float) -> bool:
        y = noise * size + delta * m
        return float((_flip_p(y, signs) < ALPHA).mean()) >= POWER

    high = _z_sum() * math.sqrt(float(np.sum(u**2))) / float(m.sum())
    while not detected(high):
        high *= 2
    return 100.0 * _bisect(high, 0.0, detected, tol=1e-6)


def _unit_interval(u, m, difference: float, n_resamples: int, rng) -> tuple[float, float]:
    """The percentile bootstrap interval (percent) of sum(u) / sum(m) over resampled units."""
    means = u / m
    if np.all(means == means[0]):
        # every resample has the same mean: the interval is that point (scipy would warn, NaN)
        return difference, difference
    boot = stats.bootstrap(
        (u, m),
        _ratio,
        paired=True,
        n_resamples=n_resamples,
        batch=BATCH,
        vectorized=True,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=rng,
    )
    return 100.0 * float(boot.confidence_interval.low), 100.0 * float(boot.confidence_interval.high)


def _unit_sign_flip(changed, lcm: int, n_resamples: int, rng) -> tuple[float, float, bool]:
    """The two-sided sign-flip p of the units' integer gains ``changed`` (L x U_g): exact up to
    EXACT_LIMIT, else Monte Carlo with its 95% error bound; returns (p, error, exact)."""
    if changed.size * int(np.abs(changed).sum()) <= EXACT_LIMIT:
        return sign_flip_p(changed), 0.0, True
    perm = stats.permutation_test(
        (changed / lcm,),
        lambda x, axis=-1: np.sum(x, axis=axis),
        vectorized=True,
        permutation_type="samples",
        n_resamples=n_resamples,
        batch=BATCH,
        alternative="two-sided",
        rng=rng,
    )
    p_value = float(perm.pvalue)
    return p_value, 1.96 * math.sqrt(p_value * (1 - p_value) / n_resamples), False


def on_test_set(
    cells: Mapping[str, Sequence[Predictions]],
    weights: Mapping[str, int],
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Question 1, "on this test set": the contrast ``weights`` of the ``cells`` on their shared
    test images, resampling the independent unit (see the module docstring).

    Returns, in percentage points: ``difference`` (the contrast of the cells' seed-averaged
    accuracies on the shared images), its 95% percentile-bootstrap ``ci_low``/``ci_high`` over
    units, the two-sided sign-flip ``p_value`` over units, ``p_exact`` and ``p_error`` (0 when
    exact, else the 95% Monte Carlo error bound), ``mde`` (the difference detectable with 80%
    power at two-sided 0.05), ``unit`` ("subject", "image", or "subject or image"),
    ``n_units``, ``n_images``, ``n_runs`` (joined (seed, fold) trials), ``n_changed`` (images
    whose d_i is nonzero), ``n_units_changed``, ``accuracies`` (cell -> percent on the shared
    images) and ``method``. Deterministic for a given ``seed``.
    """
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    n_resamples = int(n_resamples)
    joined = _join(cells, weights)
    d = joined.d
    n = int(d.size)
    lcm = int(np.lcm.reduce(joined.count))
    scaled = joined.numerator * (lcm // joined.count)  # L * d_i, integers
    v = np.bincount(joined.unit, weights=scaled).round().astype(np.int64)  # L * U_g
    u = v / lcm
    m = np.bincount(joined.unit).astype(float)  # per unit: its images
    g = int(u.size)
    boot_rng, perm_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    # from the integers, so that whole-image gains come out exact (45 of 300 -> 15.0)
    difference = 100.0 * float(v.sum()) / lcm / n
    changed = v[v != 0]
    p_value, p_error, exact = _unit_sign_flip(changed, lcm, n_resamples, perm_rng)
    unit = _unit_name(joined.grouped)
    units = f"{unit}s" if unit != "subject or image" else "subjects (images without one)"

    spread = math.sqrt(float(np.sum(u**2)))
    note, ci_low, ci_high, mde = "", math.nan, math.nan, math.nan
    if smallest_p(g) >= ALPHA:  # no outcome reaches the level: no interval, no noise floor
        note = f"n/a: no p < {ALPHA} is possible with {g} {units}"
        interval = "none (the test cannot reject)"
    elif spread == 0:
        note = "n/a: no test image changed"
        interval = "none (the cells agree on every image)"
    elif g <= INVERT_LIMIT:  # the test's own interval and power, exact in its discreteness
        signs = _sign_vectors(g, n_resamples, boot_rng)
        ci_low, ci_high = _inverted_interval(u, m, signs)
        noise = boot_rng.choice((-1.0, 1.0), size=(NOISE_DRAWS, g))
        mde = _sign_flip_mde(u, m, _sign_vectors(g, POWER_SIGNS, boot_rng), noise)
        interval = "the sign-flip test inverted"
    else:
        ci_low, ci_high = _unit_interval(u, m, difference, n_resamples, boot_rng)
        mde = 100.0 * _z_sum() * spread / n
        resampler = "cluster bootstrap" if joined.grouped.any() else "bootstrap"
        interval = f"percentile {resampler} over {units} ({n_resamples} resamples)"
    if exact:
        flips = "exact"
        pairwise = len(weights) == 2 and g == n and len(next(iter(joined.runs.values()))) == 1
        if pairwise:
            flips += ", = McNemar's exact test"
    else:
        flips = f"Monte Carlo, {n_resamples} sign vectors, p within ±{p_error:.4f} (95%)"
    hits = joined.hits.items()
    return {
        "difference": difference,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": p_value,
        "p_exact": bool(exact),
        "p_error": p_error,
        "mde": mde,
        "note": note,
        "unit": unit,
        "n_units": g,
        "n_images": n,
        "n_runs": len(next(iter(joined.runs.values()))),
        "n_changed": int(np.sum(joined.numerator != 0)),
        "n_units_changed": int(changed.size),
        "accuracies": {c: 100.0 * float((h / joined.count).sum()) / n for c, h in hits},
        "method": f"sign-flip test over {units} ({flips}); 95% CI: {interval}, unadjusted",
    }


def paired_comparison(
    reference: Sequence[Predictions],
    other: Sequence[Predictions],
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """``on_test_set`` of two cells, other minus reference, with their accuracies as
    ``reference_accuracy`` and ``other_accuracy``."""
    result = on_test_set(
        {"reference": reference, "other": other}, {"other": 1, "reference": -1}, n_resamples, seed
    )
    accuracies = result.pop("accuracies")
    return {
        **result,
        "reference_accuracy": accuracies["reference"],
        "other_accuracy": accuracies["other"],
    }


def run_differences(
    cells: Mapping[str, Sequence[Predictions]], weights: Mapping[str, int]
) -> dict[Key, float]:
    """Each joined (seed, fold) run's contrast of test accuracies (percent), taken on the images
    its trials share: the input of ``across_runs``."""
    runs = _join(cells, weights).runs
    keys = next(iter(runs.values()))
    return {k: sum(weights[c] * runs[c][k] for c in weights) for k in keys}


@cache
def _noncentrality(df: int) -> float:
    """The noncentrality at which a two-sided t-test with ``df`` degrees of freedom rejects at
    ALPHA with probability POWER (``scipy.stats.nct``; statsmodels' ``TTestPower`` is the same
    function, but its solver fails where scipy's lower tail turns NaN)."""
    from scipy.optimize import brentq

    crit = float(stats.t.ppf(1 - ALPHA / 2, df))

    def short(ncp: float) -> float:
        lower = float(np.nan_to_num(stats.nct.cdf(-crit, df, ncp)))  # NaN: far below 1e-20
        return float(stats.nct.sf(crit, df, ncp)) + lower - POWER

    if df > 100_000:  # the normal limit, to 1e-5
        return _z_sum()
    return float(brentq(short, _z_sum() - 0.1, crit + 3 * _z_sum() + 10, xtol=1e-10))


def minimum_detectable_runs_difference(sd: float, units: int, fold_ratio: float = 0.0) -> float:
    """The smallest true mean difference a two-sided t-test over ``units`` values with SD ``sd``
    detects with 80% power at alpha 0.05, the variance of the mean ``sd**2 (1/units +
    fold_ratio)`` (noncentral t, units - 1 degrees of freedom). NaN for fewer than two units or
    no spread."""
    if units < 2 or not sd > 0:
        return math.nan
    return _noncentrality(units - 1) * sd * math.sqrt(1 / units + fold_ratio)


def _fewest(enough, low: int) -> float:
    """The smallest n >= low for which ``enough(n)`` holds (it holds from some n on), inf when
    it does not by MAX_SEEDS."""
    if not enough(MAX_SEEDS):
        return math.inf
    high = low
    while not enough(high):
        low, high = high + 1, high * 2
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid + 1, high)
    return float(low)


def seeds_needed(difference: float, sd: float) -> float:
    """On a fixed split: the fewest seeds (K >= 2) whose MDE with run-to-run SD ``sd`` is at
    most ``|difference|``; inf when none up to a million is, NaN when ``sd`` is not positive."""
    if not sd > 0 or math.isnan(difference):
        return math.nan
    return _fewest(lambda k: minimum_detectable_runs_difference(sd, k) <= abs(difference), 2)


def seeds_needed_kfold(
    difference: float, between: float, within: float, folds: int, fold_ratio: float
) -> float:
    """On k-fold CV: the fewest seeds per fold whose MDE is at most ``|difference|``, a fold's
    seed-averaged value having variance ``between + within / seeds`` (the fold's own effect, and
    the seed-to-seed variance within a fold). inf when no number of seeds reaches it: the fold
    effect and the corrected variance stay."""
    if not between + within > 0 or math.isnan(difference):
        return math.nan

    def enough(seeds: int) -> bool:
        sd = math.sqrt(between + within / seeds)
        return minimum_detectable_runs_difference(sd, folds, fold_ratio) <= abs(difference)

    return _fewest(enough, 1)


def _fold_means(keys: list[Key], values: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Per fold the mean over its seeds; the pooled within-fold variance across seeds (NaN
    unless every fold has two seeds or more); the fewest seeds of a fold."""
    folds = sorted({f for _, f in keys})
    per_fold = [values[[i for i, (_, f) in enumerate(keys) if f == fold]] for fold in folds]
    seeds = min(len(v) for v in per_fold)
    within = float(np.mean([v.var(ddof=1) for v in per_fold])) if seeds > 1 else math.nan
    return np.array([v.mean() for v in per_fold]), within, seeds


def summarize_runs(accuracies: Mapping[Key, float], fold_ratio: float = math.nan) -> dict:
    """A cell's accuracies (percent) by (seed, fold): the mean and sample SD over its trials,
    and the 95% interval of the mean as ``across_runs`` would judge it: over the seeds on a
    fixed split, over the seed-averaged folds with the corrected variance on k-fold CV."""
    keys = sorted(accuracies)
    values = np.array([float(accuracies[k]) for k in keys], dtype=float)
    out = summarize_accuracies(values)
    if len({f for _, f in keys}) > 1:
        means, _, _ = _fold_means(keys, values)
        folds = summarize_accuracies(means, fold_ratio)
        out.update(ci_low=folds["ci_low"], ci_high=folds["ci_high"])
    return out


def across_runs(
    differences: Mapping[Key, float], fold_ratio: float = math.nan, repetitions: int = 1
) -> dict:
    """Question 2, "across training runs": the mean of the runs' contrasts ``differences``
    (percentage points, keyed by (seed, fold)); on a fixed split the paired t-test over the
    seeds, on several folds the corrected k-fold t-test over the seed-averaged folds with
    ``fold_ratio`` = n_test / n_train (see the module docstring); on ``repetitions`` > 1 drawings
    of the folds (repeated k-fold, each drawing's folds numbered on from the last's) the same
    test over every drawing's folds is Bouckaert & Frank's corrected repeated k-fold t-test.

    Returns ``n_runs`` (K), ``n_seeds``, ``n_folds``, ``n_units`` (what the test counts: seeds,
    or folds), ``corrected``, ``fold_ratio``, ``difference`` (mean D), ``sd`` (sample SD of the
    units), ``ci_low``/``ci_high`` (95% t interval), ``p_value``, ``judged`` (False below two
    units: then p, the interval, ``sd`` and the noise floor are NaN and ``note`` says why,
    "n/a: 1 seed x 1 fold"), ``mde``, ``seeds_needed`` (NaN on k-fold with one seed per fold:
    seed noise and fold effect cannot be told apart), ``note`` and ``method``.
    """
    keys = sorted(differences)
    diffs = np.array([float(differences[k]) for k in keys], dtype=float)
    if not np.all(np.isfinite(diffs)):
        raise ValueError(f"across_runs: accuracies must be finite, got differences {diffs}")
    k = len(keys)
    n_seeds, n_folds = len({s for s, _ in keys}), len({f for _, f in keys})
    corrected = n_folds > 1
    if corrected and not (math.isfinite(fold_ratio) and fold_ratio > 0):
        raise ValueError(
            f"runs over {n_folds} folds need their test/train size ratio, got {fold_ratio}"
        )
    ratio = fold_ratio if corrected else 0.0
    repeated = corrected and repetitions > 1
    if corrected:
        units, within, seeds = _fold_means(keys, diffs)
    else:
        units, within, seeds = diffs, math.nan, 1
        method = f"paired t-test over {k} seed{'s' if k != 1 else ''} on one split"
    if repeated:
        method = (
            f"corrected repeated k-fold t-test (Bouckaert & Frank 2004) over {n_folds} "
            f"folds of {repetitions} drawings, each averaged over its seeds, test/train "
            f"ratio {ratio:.3f}"
        )
    elif corrected:
        method = (
            f"corrected k-fold t-test (Nadeau & Bengio 2003) over {n_folds} folds, each "
            f"averaged over its seeds, test/train ratio {ratio:.3f}"
        )
    j = len(units)
    mean = float(units.mean()) if k else math.nan
    result = {
        "n_runs": k,
        "n_seeds": n_seeds,
        "n_folds": n_folds,
        "n_units": j,
        "corrected": corrected,
        "repetitions": repetitions if corrected else 1,
        "fold_ratio": ratio,
        "difference": mean,
        "sd": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "p_value": math.nan,
        "judged": False,
        "mde": math.nan,
        "seeds_needed": math.nan,
        "note": "",
        "method": method,
        "p_by_correlation": {},
    }
    if j < 2:
        # one (seed, fold) run: no run-to-run spread to test against
        result["note"] = "n/a: 1 seed x 1 fold" if k else "n/a: no joined runs"
        return result
    sd = float(units.std(ddof=1))
    if sd == 0 and corrected:
        result.update(sd=0.0, note="n/a: every run has the same difference")
        return result
    if sd == 0:
        # the t statistic is 0/0 or x/0: fall back on the exact sign-flip p-value
        p, low, high = (1.0 if mean == 0 else min(1.0, 2.0 / 2**j)), mean, mean
        result["method"] += "; identical differences: exact sign-flip p-value"
    else:
        se = sd * math.sqrt(1 / j + ratio)
        p = float(2 * stats.t.sf(abs(mean) / se, df=j - 1))
        half = _t_half(sd, j, ratio)
        low, high = mean - half, mean + half
    if not corrected:
        needed = seeds_needed(mean, sd)
    elif seeds > 1:  # a fold's variance: its own effect plus the seed noise averaged over seeds
        between = max(0.0, sd**2 - within / seeds)
        needed = seeds_needed_kfold(mean, between, within, j, ratio)
    else:
        needed = math.nan
    result.update(
        sd=sd,
        ci_low=low,
        ci_high=high,
        p_value=p,
        judged=True,
        mde=minimum_detectable_runs_difference(sd, j, ratio),
        seeds_needed=needed,
    )
    if corrected and not repeated:  # one split: how the answer moves with the fold correlation
        result["p_by_correlation"] = {
            rho: float(
                2 * stats.t.sf(abs(mean) / (sd * math.sqrt(1 / j + rho / (1 - rho))), df=j - 1)
            )
            for rho in FOLD_CORRELATIONS
        }
    return result


def significant_share(units: int) -> float:
    """The smallest observed mean difference a t-test over ``units`` calls significant, as a
    share of its noise floor: t_{1-alpha/2} / noncentrality (0.70 in the normal limit)."""
    df = units - 1
    return float(stats.t.ppf(1 - ALPHA / 2, df)) / _noncentrality(df)


def run_comparison(
    reference: Mapping[Key, float],
    other: Mapping[Key, float],
    fold_ratio: float = math.nan,
    repetitions: int = 1,
) -> dict:
    """``across_runs`` of two cells' run accuracies (percent), other minus reference, over
    the runs both have."""
    keys = set(reference) & set(other)
    differences = {k: float(other[k]) - float(reference[k]) for k in keys}
    return across_runs(differences, fold_ratio, repetitions)


def compare(
    cells: Mapping[str, Sequence[Predictions]],
    weights: Mapping[str, int],
    fold_ratio: float = math.nan,
    n_resamples: int = 10_000,
    seed: int = 0,
    repetitions: int = 1,
) -> dict:
    """Both questions for one contrast: ``{"test_set": on_test_set(...), "runs":
    across_runs(...)}``."""
    test_set = on_test_set(cells, weights, n_resamples=n_resamples, seed=seed)
    differences = run_differences(cells, weights)
    try:
        runs = across_runs(differences, fold_ratio, repetitions)
    except ValueError as err:  # e.g. folds without their sizes: this question alone goes
        runs = {**across_runs({}), "n_runs": len(differences), "note": f"n/a: {err}"}
    return {"test_set": test_set, "runs": runs}


def compare_cells(
    reference: Sequence[Predictions],
    other: Sequence[Predictions],
    fold_ratio: float = math.nan,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """``compare`` for other minus reference."""
    return compare(
        {"reference": reference, "other": other},
        {"other": 1, "reference": -1},
        fold_ratio,
        n_resamples,
        seed,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values, in the order given
    (``statsmodels.stats.multitest.multipletests``). NaN marks a comparison that was not made:
    it is returned as NaN and does not count towards the family's size."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float).ravel()
    valid = ~np.isnan(p)
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError(f"holm: p-values must lie in [0, 1], got {list(p_values)}")
    adjusted = p.copy()
    if valid.any():
        adjusted[valid] = multipletests(p[valid], method="holm")[1]
    return [float(v) for v in adjusted]
