"""The study report as people read it: pure functions of a ``StudyReport``, no MLflow, no Ray.

Two tables, each defined once as a list of ``Column`` (header with its unit, the text of a row,
its meaning in words) and printed the same way to the terminal, Markdown, LaTeX (booktabs) and
one self-contained HTML page with the figures:

- the cells: trials, test accuracy (mean ± SD, 95% interval), macro F1, the accuracy on the
  whole test split where leaked images were dropped from it, and the paper's number;
- the contrasts, by family: each question's difference with its interval, Holm mark and noise
  floor, and the seeds needed.

A legend explains every column and mark in words, each sentence true of the numbers beside it
(the terminal prints a short one; Markdown, HTML and LaTeX the whole one).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fermodel.plots import draw_confusion
from orchestrate.report.cv_levels import level_range
from orchestrate.report.statistics import (
    ALPHA,
    EXACT_LIMIT,
    INVERT_LIMIT,
    KFOLD_TEST,
    POWER,
    QUESTIONS,
    REPEATED_TEST,
    SIGNIFICANT_SHARE,
    significant_share,
)
from orchestrate.report.study_report import StudyReport
from orchestrate.report.tuning import MIN_IMPORTANCE_TRIALS

# the mark after a difference whose Holm-adjusted p-value is below the level
MARKS = ((0.01, "**"), (ALPHA, "*"))
PAPER_MARK = "†"
# below the legend of the Markdown and HTML pages: where the rest of the numbers are
DATA_NOTE = (
    "study_table.csv (cells: every number at full precision, per-class recall, cost) "
    "and contrasts.csv (both questions: raw and Holm-adjusted p-values, the unit, the "
    "test, the runs)"
)

LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "†": r"$\dagger$",
    "∞": r"$\infty$",
    "×": r"$\times$",
    "−": r"$-$",
    "²": r"$^2$",
}


@dataclass(frozen=True)
class Column:
    """A column of a readable table, the one source of its terminal, Markdown, HTML and LaTeX
    forms: the question it answers ("" for none), its header with its unit, the text of a row,
    its meaning in words (the legend), and whether it is text (left-aligned) or a number."""

    group: str
    header: str
    text: Callable[[Any], str]
    meaning: str
    left: bool = False

    @property
    def name(self) -> str:
        """The header with its question: unique, for a legend or a format without a row of
        questions above the headers."""
        return f"{self.header}, {self.group}" if self.group else self.header


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _num(v, fmt: str = ".2f") -> str:
    if _missing(v):
        return ""
    return "∞" if v == math.inf else format(v, fmt)


def _mean_std(mean: float, std: float) -> str:
    return "" if _missing(mean) else _num(mean) + ("" if _missing(std) else f" ± {std:.2f}")


def _interval(low: float, high: float, fmt: str = ".2f") -> str:
    return "" if _missing(low) else f"[{low:{fmt}}, {high:{fmt}}]"


def _marked(diff: float, p: float) -> str:
    """A difference in points with its significance mark."""
    if _missing(diff):
        return ""
    return f"{diff:+.2f}{_mark(p)}"


def _mark(p: float) -> str:
    return next((m for level, m in MARKS if not _missing(p) and p < level), "")


def _testset_interval(row) -> str:
    note = getattr(row, "testset_note", "")
    if isinstance(note, str) and note:
        return note
    return _interval(row.testset_ci_low, row.testset_ci_high, "+.2f")


def _runs_interval(row) -> str:
    note = row.runs_significant
    if isinstance(note, str) and note.startswith("n/a"):  # no spread to judge it by
        return note
    return _interval(row.runs_ci_low, row.runs_ci_high, "+.2f")


def _count(values: pd.Series, noun: str) -> str:
    """'30 subjects', or 'subjects (28 to 30 per comparison)' where the comparisons differ."""
    values = values.dropna()
    low, high = int(values.min()), int(values.max())
    plural = " or ".join(f"{n}s" for n in noun.split(" or "))
    if low != high:
        return f"{plural} ({low} to {high} per comparison)"
    return f"{high} {noun if high == 1 else plural}"


def _computed(report: StudyReport) -> pd.DataFrame:
    """The contrasts whose questions were computed."""
    c = report.contrasts
    return c[c.testset_diff.notna()] if len(c) else c


def _ci_method(computed: pd.DataFrame) -> str:
    few = computed.testset_n <= INVERT_LIMIT
    if few.all():
        return "CI: the values it does not reject"
    return "bootstrap CI" if not few.any() else "CI: inverted test or bootstrap (by units)"


def _testset_share(computed: pd.DataFrame) -> str:
    """The test-set column's threshold per row: its interval's half-width (the smallest shift
    the inverted test rejects) over its MDE, as a range; the normal limit where none is set."""
    half = (computed.testset_ci_high.astype(float) - computed.testset_ci_low.astype(float)) / 2
    shares = (half / computed.testset_mde.astype(float)).to_numpy()
    return _share_range(shares[np.isfinite(shares) & (shares > 0)])


def _runs_share(computed: pd.DataFrame) -> str:
    """The runs column's threshold: t_crit / noncentrality at its rows' units, as a range."""
    units = sorted({int(n) for n in _judged(computed).runs_units.dropna()})
    return _share_range([significant_share(n) for n in units if n >= 2])


def _share_range(shares) -> str:
    """'0.72', '0.40 to 0.93', or the normal limit's share where there is none."""
    if not len(shares):
        return f"about {SIGNIFICANT_SHARE:.2f}"
    low, high = f"{min(shares):.2f}", f"{max(shares):.2f}"
    return low if low == high else f"{low} to {high}"


def _units(computed: pd.DataFrame) -> str:
    """What the test-set question counts: '300 images', '6 subjects'."""
    return _count(computed.testset_n, computed.testset_unit.iloc[0])


def _corrected(computed: pd.DataFrame) -> bool:
    return bool(computed.runs_test.isin([KFOLD_TEST, REPEATED_TEST]).any())


def _repeated(computed: pd.DataFrame) -> bool:
    return bool((computed.runs_test == REPEATED_TEST).any())


def _judged(computed: pd.DataFrame) -> pd.DataFrame:
    """The contrasts the runs question could judge (two seeds or folds at least)."""
    return computed[computed.runs_p.notna()]


def _runs(computed: pd.DataFrame) -> str:
    """What the runs question counts: '3 seeds', '10 folds (each the mean of its 3 seeds)'."""
    judged = _judged(computed)
    if not len(judged):
        return "one run (no spread to judge by)"
    if _corrected(judged):
        seeds = judged.runs_seeds.max()
        each = f" (each the mean of its {seeds} seeds)" if seeds > 1 else ""
        if _repeated(judged):
            each = f" of {judged.runs_repetitions.max()} drawings" + each
        return _count(judged.runs_units, "fold") + each
    return _count(judged.runs_units, "seed")


def _runs_test(computed: pd.DataFrame) -> str:
    if _repeated(computed):
        ratio = computed.runs_fold_ratio.dropna()
        return (
            f"corrected repeated k-fold t-test (Bouckaert & Frank 2004) over "
            f"{_runs(computed)}: the variance of the mean s²(1/(r·k) + n_test/n_train), "
            f"n_test/n_train = {ratio.mean():.3f} of the actual folds, because the folds' "
            f"training sets overlap"
        )
    if _corrected(computed):
        ratio = computed.runs_fold_ratio.dropna()
        return (
            f"corrected k-fold t-test (Nadeau & Bengio 2003) over {_runs(computed)}: the "
            f"variance of the mean s²(1/k + n_test/n_train), n_test/n_train = "
            f"{ratio.mean():.3f} of the actual folds, because the folds' training sets "
            f"overlap"
        )
    return f"paired t-test over {_runs(computed)} on one split"


# ------------------------------------------------------------------------------ the cells


def cell_columns(report: StudyReport) -> list[Column]:
    """The cells table's columns: the full test and the paper's only where there are numbers."""
    t = report.table
    full = "full_accuracy" in t and t.full_accuracy.notna().any()
    corrected = "fold_ratio" in t and t.fold_ratio.notna().any()
    accuracy = "test accuracy in percent"
    if full:
        accuracy += ", on the test split without its leaked images (a copy in train)"
    if corrected:
        interval = (
            f"95% Student-t interval of the mean test accuracy, in percent, its "
            f"variance corrected for the folds' overlapping training sets: s²(1/n + "
            f"n_test/n_train), n_test/n_train = {t.fold_ratio.dropna().mean():.3f} "
            f"(Nadeau & Bengio 2003); none with one trial"
        )
    else:
        interval = (
            "95% Student-t interval of the mean test accuracy over the trials, in "
            "percent: how far the mean of these training seeds is from that of many "
            "more on this test set; none with one trial"
        )
    cols = [
        Column(
            "",
            "Cell",
            lambda r: str(r.cell),
            "the configuration, by its label in the study file",
            left=True,
        ),
        Column(
            "",
            "n",
            lambda r: str(r.trials),
            "finished trials of the cell (seeds x folds), each a model trained and tested once",
        ),
        Column(
            "",
            "Accuracy (%)",
            lambda r: _mean_std(r.accuracy, r.std),
            accuracy + ", mean ± sample standard deviation over the cell's trials (the "
            "run-to-run spread; no ± with one trial)",
        ),
        Column("", "95% CI (%)", lambda r: _interval(r.ci95_low, r.ci95_high), interval),
        Column(
            "",
            "Macro F1 (%)",
            lambda r: _num(r.macro_f1),
            "macro F1 on the test set (the unweighted mean of the classes' F1), mean over "
            "the trials, in percent",
        ),
    ]
    if full:
        cols.append(
            Column(
                "",
                "Full test (%)",
                lambda r: _num(r.full_accuracy),
                "test accuracy on the whole test split, leaked images included (what "
                "the paper and the field report), mean over the trials",
            )
        )
    if "paper" in t and t.paper.notna().any():
        header = "Paper (%)" + (PAPER_MARK if report.paper_note else "")
        meaning = (
            f"the test accuracy the paper reports for this cell on {report.dataset}, in "
            f"percent; empty where it reports none"
        )
        if report.paper_note:
            meaning += f"; {PAPER_MARK} {report.paper_note}"
        cols.append(Column("", header, lambda r: _num(r.paper), meaning))
    if "latency_ms" in t and t.latency_ms.notna().any():
        cost = "what it costs"
        cols += [
            Column(
                cost,
                "Params (M)",
                lambda r: _num(r.params / 1e6),
                "the model's parameters, in millions",
            ),
            Column(
                cost,
                "GFLOPs",
                lambda r: f"{r.gflops:.3g}",
                "floating-point operations of one forward pass on one image, in billions "
                "(torch's flop counter: a multiply-add is 2; grouped convolutions counted with "
                "their grouped weights)",
            ),
            Column(
                cost,
                "Latency (ms)",
                lambda r: f"{r.latency_ms:.3g}",
                "milliseconds per image at batch 1 on the device the trials trained on, eval "
                "mode: the median of timed runs after warm-up, median over the trials "
                "(throughput at batch 64 and peak training memory: study_table.csv)",
            ),
        ]
        if t.front.notna().any():
            cols.append(
                Column(
                    cost,
                    "Front",
                    _front_text,
                    "on the Pareto front of accuracy (higher) against latency "
                    "(lower): no other cell is at least as accurate and as fast and "
                    "better in one; otherwise the cells that are",
                )
            )
    return cols


def _front_text(r) -> str:
    if r.front is None or r.front != r.front:
        return ""
    return "yes" if r.front else f"below {r.dominated_by}"


# ------------------------------------------------------------------------------ the contrasts


def contrast_columns(report: StudyReport) -> list[Column]:
    computed = _computed(report)
    if not len(computed):
        return []
    units, runs = _units(computed), _runs(computed)
    testset, across = QUESTIONS["testset"], QUESTIONS["runs"]
    corrected = _corrected(computed)
    resampler = "cluster bootstrap" if (computed.testset_unit != "image").any() else "bootstrap"
    survives = "another seed and another training set" if corrected else "another seed"
    seeds = (
        (
            "training seeds, each running every fold, the test needs to detect the observed "
            "difference with 80% power"
        )
        if corrected
        else ("training seeds the test needs to detect the observed difference with 80% power")
    )
    if corrected:
        seeds += (
            "; ∞ where no number of seeds would: the folds share their training data, "
            "so the corrected variance never falls below s² n_test/n_train"
        )
    return [
        Column(
            "",
            "Family",
            lambda r: r.family_text,
            "the comparisons the study declares together; Holm's adjustment runs within each "
            "family, for each question on its own",
            left=True,
        ),
        Column(
            "",
            "Comparison",
            lambda r: str(r.comparison),
            "what is compared, by the study file's label: Δ adds the accuracies of the cells "
            "it lists as plus and subtracts those it lists as minus (contrasts.csv names "
            "them); A vs B is A minus B",
            left=True,
        ),
        Column(
            testset,
            "Δ (points)",
            lambda r: _marked(r.testset_diff, r.testset_p_holm),
            "the contrast of the cells' accuracies on the same test images, in percentage "
            "points, each image's correctness averaged over the seeds first; it answers "
            "whether these trained models differ on these test images, not whether the gain "
            "survives another training seed",
        ),
        Column(
            testset,
            "95% CI (points)",
            _testset_interval,
            f"95% interval of that difference, in percentage points, over the {units} of "
            f"the test set (the independent unit is the subject where the predictions name "
            f"one, else the image): up to {INVERT_LIMIT} units the differences the sign-flip "
            f"test does not reject (its inversion, which keeps its level with few units), "
            f"beyond that the percentile {resampler} interval; 'n/a' where no outcome could "
            f"reach p < {ALPHA} (5 units or fewer) or no image changed; not adjusted for "
            f"multiple comparisons, while the marks are, so an interval can exclude 0 "
            f"without a mark",
        ),
        Column(
            testset,
            "MDE (points)",
            lambda r: _num(r.testset_mde),
            f"noise floor: the true difference this test detects with {POWER:.0%} power at "
            f"two-sided {ALPHA} before Holm's adjustment, with these {units}, in percentage "
            f"points: up to {INVERT_LIMIT} units the sign-flip test's own power, counted "
            f"(exact in its few possible p-values), beyond that its normal approximation; "
            f"empty where no p < {ALPHA} is possible; an observed difference below it can "
            f"still be significant, here from {_testset_share(computed)} x MDE (each row's "
            f"interval half-width over its MDE; {SIGNIFICANT_SHARE:.2f} in the normal "
            f"limit)",
        ),
        Column(
            across,
            "Δ (points)",
            lambda r: _marked(r.runs_diff, r.runs_p_holm),
            f"the mean over the {runs} of the contrast of the runs' test accuracies, in "
            f"percentage points, each run's cells joined by seed and fold; it answers "
            f"whether the contrast survives {survives}",
        ),
        Column(
            across,
            "95% CI (points)",
            _runs_interval,
            f"95% interval of that mean from the {_runs_test(computed)}; not adjusted for "
            f"multiple comparisons; 'n/a: 1 seed x 1 fold' where a single run leaves no "
            f"run-to-run spread to judge by",
        ),
        Column(
            across,
            "MDE (points)",
            lambda r: _num(r.runs_mde),
            f"noise floor: the true mean difference that test detects with {POWER:.0%} "
            f"power at two-sided {ALPHA} before Holm's adjustment (noncentral t) if the true "
            f"run-to-run spread were the observed one, with these {runs}, in percentage "
            f"points (with a few seeds the true spread is as often larger: power at the "
            f"floor is then below {POWER:.0%}, on average 63% with 3 seeds and 69% with 5); "
            f"an observed difference can be significant from {_runs_share(computed)} x MDE",
        ),
        Column(across, "Seeds needed", lambda r: _num(r.seeds_needed, ".0f"), seeds),
    ]


def _marks_meaning(report: StudyReport) -> str:
    computed = _computed(report)
    flips = (
        "an exact sign-flip test over the units (with one seed, images as units and two "
        "cells it is McNemar's exact test)"
    )
    return (
        f"after a difference: its two-sided p-value, Holm-adjusted within its family for "
        f"each question on its own, is below {ALPHA} and below 0.01; on this test set "
        f"{flips}, across training runs the {_runs_test(computed)}"
    )


def _contrast_rows(report: StudyReport) -> pd.DataFrame:
    """The contrasts with ``family_text``: the family on the first row of each."""
    c = report.contrasts.copy()
    first = ~c.family.duplicated()
    return c.assign(family_text=np.where(first, c.family, ""))


def legend(report: StudyReport) -> list[tuple[str, str]]:
    """(column or mark, meaning in words) for both readable tables."""
    if report.tuning is not None:
        return [(c.name, c.meaning) for c in trial_columns(report)]
    entries = [(c.name, c.meaning) for c in cell_columns(report)]
    cols = contrast_columns(report)
    entries += [(c.name, c.meaning) for c in cols]
    if cols:
        entries.append(("* and **", _marks_meaning(report)))
        computed = _computed(report)
        estimated = computed[~computed.testset_p_exact.astype(bool)]
        if len(estimated):
            error = estimated.testset_p_error.max()
            entries.append(
                (
                    "Monte Carlo p-values",
                    f"{len(estimated)} test-set p-values are "
                    f"Monte Carlo estimates (the exact one would take more than "
                    f"{EXACT_LIMIT:,} additions), each within ±{error:.4f} of the "
                    f"exact value (95%)",
                )
            )
    return entries


def _full_legend(report: StudyReport) -> list[tuple[str, str]]:
    """The legend and where the numbers the tables leave out are."""
    return [*legend(report), ("CSV files", DATA_NOTE)]


def _rows(cols: list[Column], frame: pd.DataFrame) -> list[list[str]]:
    return [[c.text(row) for c in cols] for row in frame.itertuples()]


# ------------------------------------------------------------------------------ tuning

# how a trial metric reads: header, factor, format, meaning
METRIC_TEXT = {
    "best_val_accuracy": (
        "Best val. (%)",
        100,
        ".2f",
        "the best validation accuracy over its "
        "epochs, in percent (the epoch whose model the trial keeps)",
    ),
    "val_accuracy": ("Val. (%)", 100, ".2f", "validation accuracy of its last epoch, in %"),
    "val_macro_f1": ("Val. macro F1 (%)", 100, ".2f", "validation macro F1 of its last epoch"),
    "val_min_recall": (
        "Val. min recall (%)",
        100,
        ".2f",
        "the lowest per-class validation recall of its last epoch",
    ),
    "latency_ms": (
        "Latency (ms)",
        1,
        ".3g",
        "milliseconds per image at batch 1 on the device it "
        "trained on (median of timed runs after warm-up)",
    ),
    "params": ("Params (M)", 1e-6, ".2f", "the model's parameters, in millions"),
    "gflops": ("GFLOPs", 1, ".3g", "floating-point operations of one forward pass on one image"),
    "throughput": ("Images/s", 1, ".0f", "images per second at batch 64 on its device"),
}


def metric_text(metric: str, value) -> str:
    _, factor, fmt, _ = METRIC_TEXT.get(metric, (metric, 1, ".4g", ""))
    return "" if _missing(value) else format(float(value) * factor, fmt)


def _param_text(value) -> str:
    if _missing(value):
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_columns(report: StudyReport) -> list[Column]:
    """The tuning trials table: name, sampled parameters, fate, objectives, place."""
    t = report.tuning
    cols = [
        Column("", "Trial", lambda r: str(r.name), "the trial, named as its MLflow run", left=True)
    ]
    cols += [
        Column(
            "sampled",
            p,
            lambda r, p=p: _param_text(getattr(r, f"param_{p}")),
            f"the {p} Optuna sampled (empty: not sampled, its condition unmet)",
        )
        for p in t.params
    ]
    cols += [
        Column(
            "",
            "Fate",
            lambda r: str(r.fate),
            "finished (trained to its last epoch), stopped at an early-stopping rung (its "
            "results are low-fidelity: not ranked), failed (why), or interrupted",
            left=True,
        ),
        Column("", "Epochs", lambda r: str(r.epochs_run), "epochs it trained"),
    ]
    for metric, mode in t.goals:
        header, _, _, meaning = METRIC_TEXT.get(metric, (metric, 1, "", metric))
        cols.append(
            Column(
                "objectives",
                header,
                lambda r, m=metric: metric_text(m, getattr(r, m)),
                f"{meaning}; {'higher' if mode == 'max' else 'lower'} is better",
            )
        )
    if t.constraints:
        cols.append(
            Column(
                "",
                "Feasible",
                lambda r: (
                    "no: " + r.violates if r.violates else ("yes" if r.status == "FINISHED" else "")
                ),
                "whether it meets every constraint of the study (" + "; ".join(t.constraints) + ")",
                left=True,
            )
        )
    if len(t.goals) > 1:
        cols.append(
            Column(
                "",
                "Front",
                _trial_front_text,
                "on the Pareto front of the ranked trials (finished and feasible): "
                "no other is at least as good in every objective and better in one; "
                "otherwise the trials that are",
                left=True,
            )
        )
    return cols


def _trial_front_text(r) -> str:
    if not r.ranked:
        return ""
    return "yes" if r.front else f"below {r.dominated_by}"


def _goals_text(goals, values: dict) -> str:
    return ", ".join(f"{METRIC_TEXT.get(m, (m,))[0]} {metric_text(m, values[m])}" for m, _ in goals)


def tuning_lines(report: StudyReport) -> list[str]:
    """What the tuning found, in sentences: the best configuration, its re-run, what mattered,
    the front."""
    t = report.tuning
    if t is None:
        return []
    lines = []
    ranked = "finished and feasible" if t.constraints else "finished"
    if t.best is None:
        lines.append(f"best configuration: none (no {ranked} trial)")
    else:
        b = t.best
        params = ", ".join(f"{p}={_param_text(v)}" for p, v in b["params"].items())
        test = metric_text("best_val_accuracy", b["test_accuracy"])
        lines.append(
            f"best configuration ({t.goals[0][0]} among {ranked} trials): {b['name']} "
            f"({params}): {_goals_text(t.goals, b['values'])}"
            + (
                f"; test accuracy {test}% (shown after the choice, never used for it)"
                if test
                else ""
            )
        )
        if t.rerun:
            lines.append(f"re-run it over seeds as a grid study: {t.rerun}")
    ranked_count = int(t.trials.ranked.sum()) if len(t.trials) else 0
    if not t.importances and t.params:
        lines.append(
            f"importance: not computed: {ranked_count} {ranked} trial(s); fANOVA needs "
            f"{MIN_IMPORTANCE_TRIALS} or more whose objectives vary"
        )
    for metric, values in t.importances.items():
        ranked_params = ", ".join(f"{p} {v:.2f}" for p, v in values.items())
        lines.append(
            f"importance for {metric} over {ranked_count} {ranked} trials "
            f"({t.importance_method}): {ranked_params}"
        )
    if len(t.goals) > 1 and t.front:
        last = t.history.hypervolume.iloc[-1] if len(t.history) else math.nan
        reference = ", ".join(
            f"{m} {v:.4g}" for (m, _), v in zip(t.goals, t.reference, strict=True)
        )
        lines.append(
            f"Pareto front: {', '.join(t.front)}; hypervolume {last:.4g} (reference "
            f"point {reference})"
        )
    infeasible = int((t.trials.violates != "").sum()) if len(t.trials) else 0
    if t.constraints:
        lines.append(f"constraints {'; '.join(t.constraints)}: {infeasible} trial(s) infeasible")
    return lines


def _tables(report: StudyReport) -> list[tuple[list[Column], list[list[str]]]]:
    """(columns, rows) of the cells table, and of the contrasts table when there is one; a
    tuning study's trials table instead."""
    if report.tuning is not None:
        cols = trial_columns(report)
        return [(cols, _rows(cols, report.tuning.trials))]
    out = [(cell_columns(report), _rows(cell_columns(report), report.table))]
    cols = contrast_columns(report)
    if cols:
        out.append((cols, _rows(cols, _contrast_rows(report))))
    return out


def _spans(cols: list[Column]) -> list[tuple[str, int]]:
    """(question, number of columns) for each run of adjacent columns answering it."""
    return [(group, len(list(run))) for group, run in groupby(cols, key=lambda c: c.group)]


# ------------------------------------------------------------------------------ terminal


def _width(widths: list[int]) -> int:
    return sum(widths) + 2 * (len(widths) - 1)


def _text_table(cols: list[Column], rows: list[list[str]]) -> list[str]:
    """Aligned columns, text left and numbers right, each question's label centred above its
    columns."""
    widths = [max([len(c.header), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    spans, first = _spans(cols), 0
    for group, n in spans:  # a label wider than its columns widens the last of them
        if group:
            widths[first + n - 1] += max(0, len(group) + 6 - _width(widths[first : first + n]))
        first += n

    def line(texts) -> str:
        return "  ".join(
            t.ljust(w) if c.left else t.rjust(w)
            for t, w, c in zip(texts, widths, cols, strict=True)
        )

    lines = [line([c.header for c in cols]), *map(line, rows)]
    if len(spans) > 1:
        above, first = [], 0
        for group, n in spans:
            width = _width(widths[first : first + n])
            above.append(f" {group} ".center(width, "-") if group else " " * width)
            first += n
        lines.insert(0, "  ".join(above))
    return [x.rstrip() for x in lines]


def _cost_lines(report: StudyReport) -> list[str]:
    c, lines = report.cost, []
    if c.get("trials"):
        speed = c["images_per_second"]
        lines.append(
            f"cost: {c['trials']} trials ({c['finished']} finished, {c['failed']} failed), "
            f"{c['trial_hours']:.2f} trial-hours, {c['gpu_hours']:.2f} GPU-hours"
            + ("" if _missing(speed) else f", {speed:.0f} images/s")
        )
    if report.ignored:
        lines.append(
            f"not in this table: {report.ignored} finished run(s) of the experiment "
            f"that are not trials of this plan (another config, seed or fold)"
        )
    if c.get("stopped_early"):
        lines.append(
            f"early stopping: {c['stopped_early']} trials stopped, {c['saved_hours']:.2f} "
            f"trial-hours saved ({100 * c['saved_fraction']:.0f}% of running all to the end)"
        )
    return lines


def _short_legend(report: StudyReport) -> list[str]:
    lines = [
        "Accuracy: test accuracy in %, mean ± std over the n trials; CI: 95% interval"
        + (" (corrected for overlapping folds)" if report.table.fold_ratio.notna().any() else "")
    ]
    if report.paper_note:
        lines.append(f"{PAPER_MARK} {report.paper_note}")
    computed = _computed(report)
    if not len(computed):
        return lines
    test = "corrected k-fold t-test" if _corrected(computed) else "paired t-test"
    if _repeated(computed):
        test = "corrected repeated k-fold t-test"
    survives = "another seed and training set" if _corrected(computed) else "another seed"
    runs = f"does it survive {survives}? ({test} over {_runs(computed)})"
    if not len(_judged(computed)) and (computed.runs_n.fillna(0) <= 1).all():
        runs = "not asked: one seed and one fold leave no run-to-run spread (--seeds 3 asks it)"
    elif not len(_judged(computed)):  # several runs, but nothing to judge by (all alike)
        notes = computed.runs_significant.astype(str).str.removeprefix("n/a: ")
        runs = f"not judged: {notes.iloc[0]}"
    return [
        *lines,
        "Δ: the comparison's plus cells minus its minus cells (A vs B: A - B), in points",
        f"on this test set: do these models differ on these images? (exact sign-flip test, "
        f"{_ci_method(computed)}, over {_units(computed)})",
        f"across training runs: {runs}",
        f"* / **: Holm-adjusted p < {ALPHA} / 0.01 within each family and question; the CIs "
        f"are not adjusted",
        f"MDE: a true difference this large is found {POWER:.0%} of the time; smaller observed "
        f"ones can still be significant (on this test set from {_testset_share(computed)} x "
        f"MDE"
        + (f", across runs from {_runs_share(computed)} x MDE)" if len(_judged(computed)) else ")"),
        *_heuristic(computed),
        "every column explained in study_table.md, report.html, report.tex",
    ]


def _heuristic(computed: pd.DataFrame) -> list[str]:
    """On k-fold CV the runs answer rests on an assumed fold correlation: no design held its
    level over the simulated range (``orchestrate.report.cv_levels``), so it is called a heuristic,
    and one split's p is shown at other correlations."""
    if not _corrected(computed) or "runs_p_by_correlation" not in computed:
        return []
    design = "repeated k-fold" if _repeated(computed) else "one k-fold split"
    line = (
        f"across training runs on {design} is a heuristic: its test holds 5% only if the "
        f"runs' differences correlate at about n_test/n_train (not checked; simulated "
        f"levels {level_range(design)} over fold correlations 0-0.35, docs/report.md)"
    )
    shown = [
        f"{r.comparison}: {r.runs_p_by_correlation}"
        for r in computed.itertuples()
        if isinstance(r.runs_p_by_correlation, str) and r.runs_p_by_correlation
    ]
    if shown:
        line += "; p at fold correlation " + " | ".join(shown)
    return [line]


def format_table(report: StudyReport) -> str:
    """The readable tables for the terminal with a short legend (the whole one:
    study_table.md, report.html, report.tex)."""
    tables = _tables(report)
    if not tables[0][1]:
        return "\n".join([report.title, "no finished trials", *_cost_lines(report)])
    lines = [report.title]
    for cols, rows in tables:
        lines += ["", *_text_table(cols, rows)]
    if report.tuning is not None:
        return "\n".join([*lines, "", *tuning_lines(report), *_cost_lines(report)])
    return "\n".join(lines + _short_legend(report) + _cost_lines(report))


# ------------------------------------------------------------------------------ Markdown


def _markdown_escape(text: str) -> str:
    return re.sub(r"([\\|*_])", r"\\\1", text)


def markdown_table(report: StudyReport) -> str:
    """The readable tables as Markdown (each header names its question), the legend below."""
    esc = _markdown_escape
    tables = _tables(report)
    if not tables[0][1]:
        return f"**{esc(report.title)}**\n\nno finished trials"
    lines = [f"**{esc(report.title)}**"]
    for cols, rows in tables:
        lines += [
            "",
            "| " + " | ".join(esc(c.name) for c in cols) + " |",
            "|" + "|".join("---" if c.left else "---:" for c in cols) + "|",
            *("| " + " | ".join(map(esc, row)) + " |" for row in rows),
        ]
    lines.append("")
    lines += [f"- {esc(line)}" for line in tuning_lines(report)]
    lines += [f"- **{esc(name)}**: {esc(meaning)}." for name, meaning in _full_legend(report)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ LaTeX


def latex_escape(text: str) -> str:
    # one character at a time, so the braces a replacement brings are not escaped again
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)


def _latex_row(texts) -> str:
    return " & ".join(texts) + r" \\"


def _latex_cells(cols: list[Column], row: list[str]) -> str:
    """A table row, a minus sign in the numbers (not a hyphen)."""
    return _latex_row(
        latex_escape(t) if c.left else latex_escape(t).replace("-", "$-$")
        for c, t in zip(cols, row, strict=True)
    )


def _tabular(cols: list[Column], rows: list[list[str]]) -> list[str]:
    lines = [rf"\begin{{tabular}}{{{''.join('l' if c.left else 'r' for c in cols)}}}", r"\toprule"]
    spans = _spans(cols)
    if len(spans) > 1:
        above, rules, first = [], [], 1
        for group, n in spans:
            if group:
                above.append(rf"\multicolumn{{{n}}}{{c}}{{{latex_escape(group)}}}")
                rules.append(rf"\cmidrule(lr){{{first}-{first + n - 1}}}")
            else:
                above += [""] * n
            first += n
        lines += [_latex_row(above), " ".join(rules)]
    lines += [
        _latex_row(latex_escape(c.header) for c in cols),
        r"\midrule",
        *(_latex_cells(cols, row) for row in rows),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    return lines


def latex_table(report: StudyReport) -> str:
    """The readable tables as one LaTeX float with booktabs rules (``\\usepackage{booktabs}``),
    each question's label over its columns, the title and the legend in the caption."""
    caption = report.title + ". " + " ".join(f"{n}: {m}." for n, m in legend(report))
    caption += "".join(f" {line[0].upper()}{line[1:]}." for line in tuning_lines(report))
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        rf"\caption[{latex_escape(report.title)}]{{{latex_escape(caption)}}}",
        rf"\label{{tab:{re.sub(r'[^A-Za-z0-9]+', '-', report.study)}}}",
    ]
    for i, (cols, rows) in enumerate(_tables(report)):
        if i:
            lines.append(r"\par\medskip")
        lines += _tabular(cols, rows)
    lines.append(r"\end{table}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ HTML


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _confusion_figure(report: StudyReport) -> bytes | None:
    cells = [c for c, m in report.confusion.items() if m.sum()]
    if not cells:
        return None
    k = len(report.classes)
    cols = min(3, len(cells))
    rows = math.ceil(len(cells) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.9 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, cell in zip(axes, cells, strict=False):
        draw_confusion(ax, report.confusion[cell], fontsize=6)
        ax.set_xticks(range(k), report.classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(k), report.classes, fontsize=7)
        ax.set_title(cell, fontsize=9)
    for ax in axes[len(cells) :]:
        ax.axis("off")
    return _png(fig)


def _curves_figure(report: StudyReport) -> bytes | None:
    if not report.curves:
        return None
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    for cell, values in report.curves.items():
        ax.plot(range(1, len(values) + 1), values, label=cell)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (mean over trials)")
    ax.legend(fontsize=7)
    return _png(fig)


def _importance_figure(report: StudyReport) -> bytes | None:
    values = report.tuning.importances if report.tuning else {}
    if not values:
        return None
    names = sorted({p for v in values.values() for p in v})
    fig = Figure(figsize=(6.5, 0.5 + 0.45 * len(names) * len(values)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(values)
    for i, (metric, scores) in enumerate(values.items()):
        ax.barh(
            np.arange(len(names)) + i * height,
            [scores.get(n, 0.0) for n in names],
            height=height,
            label=metric,
        )
    ax.set_yticks(np.arange(len(names)) + height * (len(values) - 1) / 2, names)
    ax.set_xlabel("importance: share of the objective's variance (fANOVA)")
    ax.legend(fontsize=7)
    return _png(fig)


def _history_figure(report: StudyReport) -> bytes | None:
    t = report.tuning
    h = t.history
    if not len(h) or h.best.isna().all():
        return None
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.subplots()
    metric = t.goals[0][0]
    ax.step(
        h.trial_hours,
        [float(metric_text(metric, v) or "nan") for v in h.best],
        where="post",
        label=f"best {METRIC_TEXT.get(metric, (metric,))[0]} so far",
    )
    ax.set_xlabel("trial-hours spent (trials in sampling order)")
    ax.set_ylabel(METRIC_TEXT.get(metric, (metric,))[0])
    if "hypervolume" in h:
        other = ax.twinx()
        other.step(
            h.trial_hours, h.hypervolume, where="post", color="tab:orange", label="hypervolume"
        )
        other.set_ylabel("hypervolume of the front")
        other.legend(loc="lower right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    return _png(fig)


def _slice_figure(report: StudyReport) -> bytes | None:
    t = report.tuning
    frame = t.trials[t.trials.ranked]
    if not len(frame) or not t.params:
        return None
    metric = t.goals[0][0]
    fig = Figure(figsize=(3.2 * len(t.params), 3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(t.params)))
    y = [float(metric_text(metric, v)) for v in frame[metric]]
    for ax, p in zip(axes, t.params, strict=True):
        x = frame[f"param_{p}"]
        known = x.map(lambda v: not _missing(v)).to_numpy(dtype=bool)
        values = x[known]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ax.scatter(values.astype(float), np.array(y)[known], s=18)
            if len(values) and values.astype(float).min() > 0:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], np.array(y)[known], s=18)
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ax.set_xlabel(p)
    axes[0].set_ylabel(METRIC_TEXT.get(metric, (metric,))[0])
    return _png(fig)


def _forest_figure(report: StudyReport) -> bytes | None:
    """Each contrast's difference with its 95% interval, both questions side by side (on this
    test set above, across training runs below), its Holm mark in the label."""
    computed = _computed(report)
    if not len(computed):
        return None
    fig = Figure(figsize=(7.5, 0.9 + 0.55 * len(computed)), layout="constrained")
    ax = fig.subplots()
    labels = []
    for i, row in enumerate(computed.itertuples()):
        y = len(computed) - 1 - i
        marks = [_mark(row.testset_p_holm) or "·", _mark(row.runs_p_holm) or "·"]
        labels.append(f"{row.family}: {row.comparison} {marks[0]} {marks[1]}")
        for offset, diff, low, high, color, name in (
            (
                0.15,
                row.testset_diff,
                row.testset_ci_low,
                row.testset_ci_high,
                "tab:blue",
                "on this test set",
            ),
            (
                -0.15,
                row.runs_diff,
                row.runs_ci_low,
                row.runs_ci_high,
                "tab:orange",
                "across training runs",
            ),
        ):
            if _missing(diff):
                continue
            err = None if _missing(low) else [[diff - low], [high - diff]]
            ax.errorbar(
                [diff],
                [y + offset],
                xerr=err,
                fmt="o",
                color=color,
                capsize=3,
                label=name if i == 0 else None,
            )
    ax.axvline(0, color="#555", lw=1)
    ax.set_yticks(range(len(computed)), labels[::-1], fontsize=7)
    ax.set_xlabel("difference (percentage points) with its 95% interval")
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _front_figure(report: StudyReport) -> bytes | None:
    """Accuracy (or the first objective) against latency (or the second): a tuning study's
    trials (infeasible ones crossed) or a grid's cells (their 95% intervals), point size by
    parameters, the Pareto front joined."""
    if report.tuning is not None:
        t = report.tuning
        if len(t.goals) < 2:
            return None
        (y_metric, _), (x_metric, x_mode) = t.goals[:2]
        frame = t.trials[t.trials[[y_metric, x_metric]].notna().all(axis=1)]
        names, low, high = frame.name, None, None
        y = frame[y_metric].astype(float) * METRIC_TEXT.get(y_metric, ("", 1))[1]
        x = frame[x_metric].astype(float) * METRIC_TEXT.get(x_metric, ("", 1))[1]
        front, crossed = frame.front.to_numpy(bool), (frame.violates != "").to_numpy(bool)
    else:
        table = report.table
        if "latency_ms" not in table or table.front.isna().all():
            return None
        frame = table[table.accuracy.notna() & table.latency_ms.notna()]
        y_metric, x_metric, x_mode, names = "accuracy", "latency_ms", "min", frame.cell
        y, x = frame.accuracy.astype(float), frame.latency_ms.astype(float)
        low, high = frame.ci95_low.astype(float), frame.ci95_high.astype(float)
        front, crossed = frame.front.astype(bool).to_numpy(), np.zeros(len(frame), bool)
    if not len(frame):
        return None
    params = frame.params.astype(float) if "params" in frame else pd.Series(np.nan, frame.index)
    size = 30 + 170 * (params / params.max()).fillna(0.3) if params.notna().any() else 60
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    if low is not None and low.notna().any():
        ax.errorbar(x, y, yerr=[y - low, high - y], fmt="none", ecolor="#999", lw=1)
    ax.scatter(
        x[~crossed],
        y[~crossed],
        s=np.asarray(size)[~crossed] if np.ndim(size) else size,
        c=np.where(front[~crossed], "tab:red", "tab:blue"),
        alpha=0.75,
    )
    if crossed.any():
        ax.scatter(x[crossed], y[crossed], marker="x", c="#777", label="infeasible")
        ax.legend(fontsize=7)
    order = np.argsort(x[front].to_numpy())
    ax.plot(x[front].to_numpy()[order], y[front].to_numpy()[order], c="tab:red", lw=1)
    for xi, yi, name in zip(x, y, names, strict=True):
        ax.annotate(str(name), (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(
        METRIC_TEXT.get(x_metric, (x_metric,))[0]
        + (" (lower is better)" if x_mode == "min" else "")
    )
    ax.set_ylabel(
        "test accuracy (%), mean and 95% CI"
        if report.tuning is None
        else METRIC_TEXT.get(y_metric, (y_metric,))[0]
    )
    return _png(fig)


def _html_table(cols: list[Column], rows: list[list[str]]) -> str:
    """A table, text left and numbers right, a header row above naming the question each group
    of columns answers."""
    esc = html.escape
    spans = _spans(cols)
    above = (
        "".join(
            f"<th colspan={n} class=question>{esc(g)}</th>" if g else f"<th colspan={n}></th>"
            for g, n in spans
        )
        if len(spans) > 1
        else ""
    )
    head = (
        (f"<tr>{above}</tr>" if above else "")
        + "<tr>"
        + "".join(f"<th>{esc(c.header)}</th>" for c in cols)
        + "</tr>"
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(t)}</td>" if c.left else f"<td class=num>{esc(t)}</td>"
            for c, t in zip(cols, row, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"


def to_html(report: StudyReport) -> str:
    def img(data: bytes | None, alt: str) -> str:
        if data is None:
            return ""
        encoded = base64.b64encode(data).decode()
        return f'<figure><img alt="{alt}" src="data:image/png;base64,{encoded}"><figcaption>{alt}</figcaption></figure>'  # noqa: E501

    esc = html.escape
    tables = _tables(report)
    if report.tuning is not None:
        body = [
            "<h2>Trials</h2>",
            _html_table(*tables[0]),
            "".join(f"<p>{esc(line)}</p>" for line in tuning_lines(report)),
            "<h3>Legend</h3><dl class=legend>"
            + "".join(
                f"<dt>{esc(name)}</dt><dd>{esc(meaning)}.</dd>"
                for name, meaning in _full_legend(report)
            )
            + "</dl>",
        ]
    elif tables[0][1]:
        body = ["<h2>Test accuracy per cell</h2>", _html_table(*tables[0])]
        if len(tables) > 1:
            forest = (
                "each comparison's difference and 95% interval, both questions (marks: "
                "Holm-adjusted, test set then runs)"
            )
            body += [
                "<h2>Comparisons</h2>",
                _html_table(*tables[1]),
                img(_forest_figure(report), forest),
            ]
        body.append(
            "<h3>Legend</h3><dl class=legend>"
            + "".join(
                f"<dt>{esc(name)}</dt><dd>{esc(meaning)}.</dd>"
                for name, meaning in _full_legend(report)
            )
            + "</dl>"
        )
    else:
        body = ["<p>no finished trials</p>"]
    found = []
    if report.tuning is not None:  # what the search found, before what the trials cost
        t = report.tuning
        found = [
            "<h2>What the search found</h2>",
            img(_front_figure(report), "the trials' objectives, the Pareto front joined"),
            img(_history_figure(report), "optimisation history against trial-hours"),
            img(_importance_figure(report), f"parameter importances ({t.importance_method})"),
            img(_slice_figure(report), f"{t.goals[0][0]} against each sampled parameter"),
        ]
    elif front := _front_figure(report):
        caption = "accuracy against latency per cell (point size: parameters), the front joined"
        found = [img(front, caption)]
    parts = [
        f"<h1>{esc(': '.join(filter(None, (report.study, report.description))))}</h1>",
        f"<p class=title>{esc(report.title)}</p>",
        f"<p>session <code>{esc(report.session)}</code></p>",
        *body,
        *found,
        "<h2>Cost</h2>",
        "".join(f"<p>{esc(line)}</p>" for line in _cost_lines(report)),
        img(_confusion_figure(report), "confusion matrices (test, rows normalised, all trials)"),
        img(_curves_figure(report), "validation accuracy per epoch"),
        img(report.distribution_png, "class distribution of the training split"),
    ]
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:"
        "collapse}td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px}"
        "td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}"
        "img{max-width:100%}figure{margin:1.5em 0}th.question{background:#eef}"
        "dl.legend dt{margin-top:.4em;font-weight:bold}"
        "dl.legend dd{margin-left:2em;font-size:13px}"
    )
    title = esc(report.study)
    head = f"<meta charset=utf-8><title>{title} report</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"
