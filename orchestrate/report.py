"""The study report, built from MLflow alone: paper-style table, honest statistics, figures, cost.

Rows come from the FINISHED child runs of one study session (an invocation and its resumes, each
trial counted once). Per cell: test accuracy over seeds and folds (mean, std, 95% t interval),
macro F1 and per-class recall, the paper's number, and the cost (trial hours, GPU hours,
images/s). Against the reference cell, two questions answered separately
(``orchestrate.statistics``), each Holm-adjusted across cells on its own: ``testset_*``, "on
this test set" (paired over the test images, resampling the independent unit: the subject where
the predictions name one, else the image), and ``runs_*``, "across training runs" (a paired
t-test over the (seed, fold) runs both cells have; n/a with one seed and one fold), each with its
noise floor (the smallest difference detectable at 80% power, and the seeds needed to detect the
observed one). Those are the raw columns of ``StudyReport.table`` and of the CSV; the readable
table (``columns``: each column's header with its unit, its text and its meaning in words)
prints the same rows as text, Markdown, LaTeX (booktabs) and HTML, with a legend of every column
and significance mark. Tuning studies get the best configs, Optuna's parameter importances, and
the compute that ASHA's early stopping saved. Outputs: the terminal table, Markdown, LaTeX, CSV
and one self-contained HTML page with the figures, all logged to the parent run.

``python -m orchestrate.report --study NAME`` (or ``--run PARENT_ID``) rebuilds it without
re-running anything.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from orchestrate.statistics import (
    ALPHA,
    POWER,
    Predictions,
    compare_cells,
    holm,
    summarize_accuracies,
)
from orchestrate.tracking import PARENT_TAG, SESSION_TAG, StudyTracker

STUDY_ARTIFACT = "study.toml"
DISTRIBUTION_ARTIFACT = "class_distribution.png"

# the two questions' raw columns (the CSV's), in table order; "testset_" answers "on this test
# set", "runs_" (and seeds_needed) "across training runs"
TESTSET_COLUMNS = [
    "testset_unit",
    "testset_n",
    "testset_diff",
    "testset_ci_low",
    "testset_ci_high",
    "testset_p_holm",
    "testset_significant",
    "testset_mde",
]
RUNS_COLUMNS = ["runs_n", "runs_diff", "runs_ci_low", "runs_ci_high", "runs_p_holm",
                "runs_significant", "runs_sd", "runs_mde", "seeds_needed"]  # fmt: skip
QUESTIONS = {"testset": "on this test set", "runs": "across training runs"}


@dataclass
class StudyReport:
    study: str
    description: str
    kind: str
    dataset: str
    session: str
    reference: str | None
    table: pd.DataFrame  # one row per cell
    trials: pd.DataFrame  # one row per trial
    method: str
    cost: dict
    classes: list[str] = field(default_factory=list)
    confusion: dict = field(default_factory=dict)  # cell -> summed confusion matrix
    curves: dict = field(default_factory=dict)  # cell -> mean validation accuracy per epoch
    best: pd.DataFrame | None = None  # tuning: best trials
    importances: dict = field(default_factory=dict)  # tuning: parameter -> importance
    distribution_png: bytes | None = None


# ---------------------------------------------------------------------------------- collect


def session_frame(tracker: StudyTracker, session: str) -> pd.DataFrame:
    """One row per trial of the session: tags, status, params of interest, final metrics."""
    rows = []
    for run in tracker.session_runs(session):
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        rows.append(
            {
                "run_id": run.info.run_id,
                "status": run.info.status,
                "cell": tags.get("cell", ""),
                "seed": int(tags.get("seed", 0)),
                "fold": int(tags.get("fold", 0)),
                "trial": tags.get("ray_trial_id", ""),
                "sampled": tags.get("sampled", ""),
                "stopped_early": tags.get("stopped_early") == "true",
                "error": tags.get("error", ""),
                "planned_epochs": int(params.get("epochs", 0) or 0),
                "epochs_run": int(metrics.get("epoch", 0)),
                **{k: v for k, v in metrics.items() if k.startswith(("test_", "best_"))},
                **{k: metrics.get(k, math.nan)
                   for k in ("train_seconds", "trial_seconds", "mean_images_per_second")},
            }
        )  # fmt: skip
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.drop_duplicates("trial", keep="last").reset_index(drop=True)


def _parents(tracker: StudyTracker, session: str):
    return sorted(tracker.session_runs(session, parents=True), key=lambda r: r.info.start_time)


def _artifact(tracker: StudyTracker, run_id: str, name: str, folder: str) -> Path | None:
    try:
        return Path(tracker.client.download_artifacts(run_id, name, folder))
    except Exception:  # absent artifact: MLflow raises store-specific errors
        return None


def _study_meta(tracker: StudyTracker, session: str, folder: str) -> dict:
    """The study file as logged on the session's first parent run (cells, labels, paper)."""
    for parent in _parents(tracker, session):
        path = _artifact(tracker, parent.info.run_id, STUDY_ARTIFACT, folder)
        if path is not None:
            return tomllib.loads(path.read_text())
    return {}


def build_report(tracker: StudyTracker, session: str, n_resamples: int = 10_000) -> StudyReport:
    parents = _parents(tracker, session)
    if not parents:
        raise ValueError(f"no parent run of study session {session!r} in this store")
    first = parents[0]
    params = first.data.params
    frame = session_frame(tracker, session)
    done = (
        frame[(frame.status == "FINISHED") & frame.get("test_accuracy", pd.Series()).notna()]
        if len(frame)
        else frame
    )
    with tempfile.TemporaryDirectory(prefix="fer-report-") as folder:
        meta = _study_meta(tracker, session, folder)
        predictions = {
            row.run_id: json.loads(path.read_text())
            for row in done.itertuples()
            if (path := _artifact(tracker, row.run_id, "predictions.json", folder)) is not None
        }
        distribution = None
        for parent in parents:
            png = _artifact(tracker, parent.info.run_id, DISTRIBUTION_ARTIFACT, folder)
            if png is not None:
                distribution = png.read_bytes()
                break
    kind = meta.get("kind", first.data.tags.get("kind", "grid"))
    dataset = params.get("dataset", "")
    cells = meta.get("cells", [])
    labels = {c["name"]: c.get("label", c["name"]) for c in cells}
    paper = {c["name"]: c.get("paper", {}).get(dataset, math.nan) for c in cells}
    order = [c["name"] for c in cells] or sorted(done.cell.unique()) if len(done) else []
    reference = meta.get("reference", order[0] if order and kind == "grid" else None)
    gpus = float(params.get("gpus_per_trial", 0) or 0)

    trial_preds = {
        cell: [
            # "groups" (the subject of each test image) is absent in older artifacts
            Predictions(
                row.seed, row.fold, p["ids"], p["labels"], p["predictions"], p.get("groups")
            )
            for row in done[done.cell == cell].itertuples()
            if (p := predictions.get(row.run_id)) is not None
        ]
        for cell in order
    }
    rows, comparisons = [], {}
    for cell in order:
        sub = done[done.cell == cell]
        acc = summarize_accuracies(list(100 * sub.test_accuracy))
        hours = sub.trial_seconds.sum() / 3600
        row = {
            "cell": labels.get(cell, cell),
            "key": cell,
            "trials": acc["n"],
            "accuracy": acc["mean"],
            "std": acc["std"],
            "ci95_low": acc["ci_low"],
            "ci95_high": acc["ci_high"],
            "macro_f1": 100 * sub.test_macro_f1.mean() if len(sub) else math.nan,
            "paper": paper.get(cell, math.nan),
            "trial_hours": hours,
            "gpu_hours": hours * gpus,
            "images_per_second": sub.mean_images_per_second.mean() if len(sub) else math.nan,
        }
        for col in sorted(c for c in sub.columns if c.startswith("test_recall_")):
            row[col.replace("test_", "")] = 100 * sub[col].mean()
        if kind == "grid" and reference and cell != reference:
            ref, other = trial_preds.get(reference, []), trial_preds.get(cell, [])
            if ref and other:
                comparisons[cell] = compare_cells(ref, other, n_resamples=n_resamples)
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        columns = comparison_columns(list(table.key), comparisons)
        table = pd.concat([table, columns.reset_index(drop=True)], axis=1)
        leading = ["cell", "key", "trials", "accuracy", "std", "ci95_low", "ci95_high",
                   "macro_f1", "paper", *TESTSET_COLUMNS, *RUNS_COLUMNS]  # fmt: skip
        table = table[leading + [c for c in table.columns if c not in leading]]

    classes = next(iter(predictions.values()), {}).get("classes", [])
    confusion = {}
    for cell in order:
        total = np.zeros((len(classes), len(classes)), dtype=int)
        for p in trial_preds.get(cell, []):
            np.add.at(total, (p.labels, p.predictions), 1)
        confusion[cell] = total
    curves = {}
    for cell in order:
        histories = [
            [m.value for m in sorted(tracker.client.get_metric_history(r, "val_accuracy"),
                                     key=lambda m: m.step)]
            for r in done[done.cell == cell].run_id
        ]  # fmt: skip
        if histories:
            length = max(map(len, histories))
            padded = np.full((len(histories), length), np.nan)
            for i, h in enumerate(histories):
                padded[i, : len(h)] = h
            curves[cell] = list(np.nanmean(padded, axis=0))

    cost = _cost(frame, gpus)
    best, importances = (None, {})
    if kind == "tune" and len(done):
        best, importances = _tuning(done, meta)
    if comparisons:
        first_comparison = comparisons[next(iter(comparisons))]
        method = (
            f"{first_comparison['test_set']['method']}; {first_comparison['runs']['method']}; "
            f"p-values Holm-adjusted across cells for each question separately (Holm 1979), "
            f"alpha {ALPHA}; noise floors at {POWER:.0%} power"
        )
    else:
        method = "no paired comparison (a tuning study, or no reference trials)"
    return StudyReport(
        study=first.data.tags.get("study", ""),
        description=meta.get("description", ""),
        kind=kind,
        dataset=dataset,
        session=session,
        reference=labels.get(reference, reference) if reference else None,
        table=table,
        trials=frame,
        method=method,
        cost=cost,
        classes=classes,
        confusion={labels.get(k, k): v for k, v in confusion.items()},
        curves={labels.get(k, k): v for k, v in curves.items()},
        best=best,
        importances=importances,
        distribution_png=distribution,
    )


def comparison_columns(keys: list[str], comparisons: dict[str, dict]) -> pd.DataFrame:
    """The statistics columns of both questions for the cells ``keys``, in that order, from
    ``compare_cells`` results by cell key (NaN and "" where a cell, such as the reference, has
    none). Each question's p-values are Holm-adjusted across the cells on their own."""
    done = [k for k in keys if k in comparisons]
    test_p = dict(zip(done, holm([comparisons[k]["test_set"]["p_value"] for k in done]),
                      strict=True))  # fmt: skip
    runs_p = dict(zip(done, holm([comparisons[k]["runs"]["p_value"] for k in done]),
                      strict=True))  # fmt: skip
    rows = []
    for key in keys:
        if key not in comparisons:
            rows.append({c: "" if c.endswith(("_unit", "_significant")) else math.nan
                         for c in TESTSET_COLUMNS + RUNS_COLUMNS})  # fmt: skip
            continue
        t, r = comparisons[key]["test_set"], comparisons[key]["runs"]
        if r["judged"]:
            runs_verdict = "yes" if runs_p[key] < ALPHA else "no"
        else:
            runs_verdict = r["note"]  # "n/a: 1 seed x 1 fold": no p-value to print
        rows.append({
            "testset_unit": t["unit"], "testset_n": t["n_units"],
            "testset_diff": t["difference"], "testset_ci_low": t["ci_low"],
            "testset_ci_high": t["ci_high"], "testset_p_holm": test_p[key],
            "testset_significant": "yes" if test_p[key] < ALPHA else "no",
            "testset_mde": t["mde"],
            "runs_n": r["n_runs"], "runs_diff": r["difference"], "runs_ci_low": r["ci_low"],
            "runs_ci_high": r["ci_high"], "runs_p_holm": runs_p[key],
            "runs_significant": runs_verdict, "runs_sd": r["sd"], "runs_mde": r["mde"],
            "seeds_needed": r["seeds_needed"],
        })  # fmt: skip
    # counts stay integers in the CSV, with an empty cell for the reference
    frame = pd.DataFrame(rows, columns=TESTSET_COLUMNS + RUNS_COLUMNS)
    return frame.astype({"testset_n": "Int64", "runs_n": "Int64"})


def _cost(frame: pd.DataFrame, gpus: float) -> dict:
    if frame.empty:
        return {"trials": 0}
    hours = frame.trial_seconds.fillna(0).sum() / 3600
    cost = {
        "trials": len(frame),
        "finished": int((frame.status == "FINISHED").sum()),
        "failed": int((frame.status == "FAILED").sum()),
        "trial_hours": hours,
        "gpu_hours": hours * gpus,
        "images_per_second": frame.mean_images_per_second.mean(),
    }
    stopped = frame[frame.stopped_early & (frame.epochs_run > 0)]
    if len(stopped):
        per_epoch = stopped.train_seconds / stopped.epochs_run
        saved = ((stopped.planned_epochs - stopped.epochs_run).clip(lower=0) * per_epoch).sum()
        full = hours * 3600 + saved
        cost["stopped_early"] = len(stopped)
        cost["saved_hours"] = saved / 3600
        cost["saved_fraction"] = saved / full if full else math.nan
    return cost


def _tuning(done: pd.DataFrame, meta: dict) -> tuple[pd.DataFrame, dict]:
    import optuna

    sampled = [dict(kv.split("=", 1) for kv in s.split(",") if kv) for s in done.sampled]
    best = done.assign(params=[", ".join(f"{k}={v}" for k, v in s.items()) for s in sampled])
    metric = "best_val_accuracy"
    best = best.sort_values(metric, ascending=False)[["params", metric, "test_accuracy"]].head(10)
    space = {p["name"]: p for p in meta.get("space", [])}
    always = [n for n, p in space.items() if not p.get("when")]
    distributions = {}
    for name in always:
        p = space[name]
        if p["type"] == "categorical":
            distributions[name] = optuna.distributions.CategoricalDistribution(p["choices"])
        else:
            log = p["type"] == "loguniform"
            distributions[name] = optuna.distributions.FloatDistribution(
                p["low"], p["high"], log=log
            )
    study = optuna.create_study(direction="maximize")
    for values, score in zip(sampled, done[metric], strict=True):
        if all(n in values for n in always) and score == score:
            params = {n: _sampled_value(space[n], values[n]) for n in always}
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=distributions, value=float(score)
            ))  # fmt: skip
    importances = {}
    if len(study.trials) >= 2 and len(set(t.value for t in study.trials)) > 1:
        importances = dict(optuna.importance.get_param_importances(study))
    return best.reset_index(drop=True), importances


def _sampled_value(param: dict, text: str):
    """A sampled value as the study file typed it (MLflow tags hold text)."""
    if param["type"] != "categorical":
        return float(text)
    return next((c for c in param["choices"] if str(c) == text), text)


# ---------------------------------------------------------------------------------- format

# the mark after a difference whose Holm-adjusted p-value is below the level
MARKS = ((0.01, "**"), (ALPHA, "*"))
# below the legend of the Markdown and HTML pages: where the rest of the numbers are
DATA_NOTE = "every number at full precision, with per-class recall and the cost per cell"
STATISTICS_NOTE = "; the Holm-adjusted p-values (testset_p_holm, runs_p_holm)"

LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "Δ": r"$\Delta$",
}  # fmt: skip


@dataclass(frozen=True)
class Column:
    """A column of the readable table, the one source of its terminal, Markdown, HTML and LaTeX
    forms: the question it answers ("" for the cell's own numbers), its header with its unit,
    the text of a row, and its meaning in words (the legend)."""

    group: str
    header: str
    text: Callable[[Any], str]
    meaning: str

    @property
    def name(self) -> str:
        """The header with its question: unique, for a legend or a format without a row of
        questions above the headers."""
        return f"{self.header}, {self.group}" if self.group else self.header


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _num(v, fmt: str = ".2f") -> str:
    return "" if _missing(v) else format(v, fmt)


def _mean_std(mean: float, std: float) -> str:
    return "" if _missing(mean) else _num(mean) + ("" if _missing(std) else f" ± {std:.2f}")


def _interval(low: float, high: float, fmt: str = ".2f") -> str:
    return "" if _missing(low) else f"[{low:{fmt}}, {high:{fmt}}]"


def _marked(diff: float, p: float) -> str:
    """A difference in points with its significance mark."""
    if _missing(diff):
        return ""
    mark = next((m for level, m in MARKS if not _missing(p) and p < level), "")
    return f"{diff:+.2f}{mark}"


def _runs_interval(row) -> str:
    if row.runs_significant.startswith("n/a"):  # one paired run: no spread to judge it by
        return row.runs_significant
    return _interval(row.runs_ci_low, row.runs_ci_high, "+.2f")


def _count(values: pd.Series, noun: str) -> str:
    """'30 subjects', or 'subjects (28 to 30 per cell)' where the compared cells differ."""
    low, high = int(values.min()), int(values.max())
    plural = " or ".join(f"{n}s" for n in noun.split(" or "))
    if low != high:
        return f"{plural} ({low} to {high} per cell)"
    return f"{high} {noun if high == 1 else plural}"


def _compared(report: StudyReport) -> pd.DataFrame:
    """The rows that were compared with the reference."""
    t = report.table
    if not len(t) or "testset_diff" not in t:
        return t.iloc[:0]
    return t[t.testset_diff.notna()]


def _sizes(compared: pd.DataFrame) -> tuple[str, str]:
    """What the two questions count: the test set's units and the paired runs."""
    units = _count(compared.testset_n, compared.testset_unit.iloc[0])
    return units, _count(compared.runs_n, "paired (seed, fold) run")


def _question_columns(compared: pd.DataFrame) -> list[Column]:
    units, runs = _sizes(compared)
    testset, across = QUESTIONS["testset"], QUESTIONS["runs"]
    return [
        Column(testset, "Δ (points)", lambda r: _marked(r.testset_diff, r.testset_p_holm),
               "the cell's minus the reference's accuracy on the same test images, in percentage "
               "points, each image's correctness averaged over the seeds first; it answers whether "
               "these trained models differ on these test images, not whether the gain survives "
               "another training seed"),
        Column(testset, "95% CI (points)",
               lambda r: _interval(r.testset_ci_low, r.testset_ci_high, "+.2f"),
               f"95% percentile bootstrap interval of that difference, in percentage points, "
               f"resampling the {units} of the test set: the independent unit is the subject "
               f"where the predictions name one (a person's frames are not independent), else "
               f"the image"),
        Column(testset, "MDE (points)", lambda r: _num(r.testset_mde),
               f"noise floor: the smallest difference this test detects with {POWER:.0%} power "
               f"at two-sided {ALPHA} with these {units}, in percentage points; a smaller "
               f"difference cannot be told from noise at this size"),
        Column(across, "Δ (points)", lambda r: _marked(r.runs_diff, r.runs_p_holm),
               f"the mean over the {runs} of the cell's minus the reference's test accuracy, in "
               f"percentage points, each trial of the cell paired with the reference's trial of "
               f"the same seed and fold; it answers whether the gain survives another seed"),
        Column(across, "95% CI (points)", _runs_interval,
               "95% Student-t interval of that mean, in percentage points; 'n/a: 1 seed x 1 "
               "fold' where a single paired run leaves no run-to-run spread to judge it by"),
        Column(across, "MDE (points)", lambda r: _num(r.runs_mde),
               f"noise floor: the smallest mean difference the paired t-test detects with "
               f"{POWER:.0%} power at two-sided {ALPHA} with this run-to-run spread and these "
               f"{runs}, in percentage points"),
        Column(across, "Seeds needed", lambda r: _num(r.seeds_needed, ".0f"),
               f"how many training seeds (each with the study's folds) would detect the observed "
               f"difference across training runs with {POWER:.0%} power"),
    ]  # fmt: skip


def columns(report: StudyReport) -> list[Column]:
    """The readable table's columns for this report: the paper's only where it gives a number,
    the two questions only where cells were compared with the reference."""
    t = report.table
    cell = "the configuration, by its label in the study file"
    if report.reference:
        cell += f"; differences are taken against the reference cell, {report.reference}"
    cols = [
        Column("", "Cell", lambda r: str(r.cell), cell),
        Column("", "n", lambda r: str(r.trials),
               "finished trials of the cell (seeds x folds), each a model trained and tested "
               "once"),
        Column("", "Accuracy (%)", lambda r: _mean_std(r.accuracy, r.std),
               "test accuracy in percent, mean ± sample standard deviation over the cell's "
               "trials (the run-to-run spread; no ± with one trial)"),
        Column("", "95% CI (%)", lambda r: _interval(r.ci95_low, r.ci95_high),
               "95% Student-t interval of the mean test accuracy, in percent (none with one "
               "trial)"),
        Column("", "Macro F1 (%)", lambda r: _num(r.macro_f1),
               "macro F1 on the test set (the unweighted mean of the classes' F1), mean over "
               "the trials, in percent"),
    ]  # fmt: skip
    if "paper" in t and t.paper.notna().any():
        paper = (f"the test accuracy the paper reports for this cell on {report.dataset}, in "
                 f"percent; empty where it reports none")  # fmt: skip
        cols.append(Column("", "Paper (%)", lambda r: _num(r.paper), paper))
    compared = _compared(report)
    return cols + (_question_columns(compared) if len(compared) else [])


def _cells(report: StudyReport) -> tuple[list[Column], list[list[str]]]:
    cols = columns(report)
    return cols, [[c.text(row) for c in cols] for row in report.table.itertuples()]


def _spans(cols: list[Column]) -> list[tuple[str, int]]:
    """(question, number of columns) for each run of adjacent columns answering it."""
    return [(group, len(list(run))) for group, run in groupby(cols, key=lambda c: c.group)]


def legend(report: StudyReport) -> list[tuple[str, str]]:
    """(column or mark, meaning in words) for this report's readable table."""
    cols = columns(report)
    marks = [
        ("* and **", f"after a difference: its two-sided p-value, Holm-adjusted across the "
         f"compared cells for each question on its own, is below {ALPHA} and below 0.01; on "
         f"this test set a sign-flip permutation test over the units (the sum of a unit's "
         f"image differences; exact McNemar with one seed and images as units), across "
         f"training runs a paired t-test over the runs"),
    ] if any(c.group for c in cols) else []  # fmt: skip
    return [(c.name, c.meaning) for c in cols] + marks


def _full_legend(report: StudyReport) -> list[tuple[str, str]]:
    """The legend and where the numbers the table leaves out are."""
    note = DATA_NOTE + (STATISTICS_NOTE if len(_compared(report)) else "")
    return [*legend(report), ("study_table.csv", note)]


def _width(widths: list[int]) -> int:
    return sum(widths) + 2 * (len(widths) - 1)


def _text_table(cols: list[Column], rows: list[list[str]]) -> list[str]:
    """Aligned columns, the cell label left, the numbers right, each question's label centred
    above its columns."""
    widths = [max([len(c.header), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    spans, first = _spans(cols), 0
    for group, n in spans:  # a label wider than its columns widens the last of them
        widths[first + n - 1] += max(0, len(group) + 6 - _width(widths[first : first + n]))
        first += n

    def line(texts) -> str:
        return "  ".join(t.ljust(w) if i == 0 else t.rjust(w)
                         for i, (t, w) in enumerate(zip(texts, widths, strict=True)))  # fmt: skip

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
        lines.append(
            f"cost: {c['trials']} trials ({c['finished']} finished, {c['failed']} failed), "
            f"{c['trial_hours']:.2f} trial-hours, {c['gpu_hours']:.2f} GPU-hours, "
            f"{_num(c['images_per_second'], '.0f')} images/s"
        )
    if c.get("stopped_early"):
        lines.append(
            f"early stopping: {c['stopped_early']} trials stopped, {c['saved_hours']:.2f} "
            f"trial-hours saved ({100 * c['saved_fraction']:.0f}% of running all to the end)"
        )
    return lines


def format_table(report: StudyReport) -> str:
    """The readable table for the terminal with a short legend (the whole one: study_table.md,
    report.html, report.tex)."""
    cols, rows = _cells(report)
    if not rows:
        return "\n".join(["no finished trials", *_cost_lines(report)])
    lines = _text_table(cols, rows)
    lines.append("Accuracy: test accuracy in %, mean ± std over the n trials; CI: 95% interval")
    compared = _compared(report)
    if len(compared):
        units, runs = _sizes(compared)
        lines += [
            f"Δ: cell minus reference ({report.reference}) in percentage points",
            f"on this test set: do these models differ on these images? (bootstrap and "
            f"sign-flip test over {units})",
            f"across training runs: does the gain survive another seed? (paired t-test over "
            f"{runs})",
            f"* / **: Holm-adjusted p < {ALPHA} / 0.01, each question on its own; every column "
            f"explained in study_table.md, report.html, report.tex",
        ]
    return "\n".join(lines + _cost_lines(report))


def _markdown_escape(text: str) -> str:
    return re.sub(r"([\\|*_])", r"\\\1", text)


def markdown_table(report: StudyReport) -> str:
    """The readable table as Markdown (each header names its question), the legend below."""
    cols, rows = _cells(report)
    if not rows:
        return "no finished trials"
    esc = _markdown_escape
    lines = [
        "| " + " | ".join(esc(c.name) for c in cols) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|",
        *("| " + " | ".join(map(esc, row)) + " |" for row in rows),
        "",
        *(f"- **{esc(name)}**: {esc(meaning)}." for name, meaning in _full_legend(report)),
    ]
    return "\n".join(lines)


def latex_escape(text: str) -> str:
    # one character at a time, so the braces a replacement brings are not escaped again
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in text)


def _latex_row(texts) -> str:
    return " & ".join(texts) + r" \\"


def _latex_cells(row: list[str]) -> str:
    """A table row, a minus sign in the numbers (not a hyphen)."""
    label, *numbers = map(latex_escape, row)
    return _latex_row([label, *(n.replace("-", "$-$") for n in numbers)])


def latex_table(report: StudyReport) -> str:
    """The readable table as a LaTeX float with booktabs rules (``\\usepackage{booktabs}``),
    each question's label over its columns, the legend in the caption."""
    cols, rows = _cells(report)
    title = f"Test accuracy on {report.dataset} ({report.study})"
    caption = title + ". " + " ".join(f"{name}: {meaning}." for name, meaning in legend(report))
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        rf"\caption[{latex_escape(title)}]{{{latex_escape(caption)}}}",
        rf"\label{{tab:{re.sub(r'[^A-Za-z0-9]+', '-', report.study)}}}",
        rf"\begin{{tabular}}{{l{'r' * (len(cols) - 1)}}}",
        r"\toprule",
    ]
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
        *map(_latex_cells, rows),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines)


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
        m = report.confusion[cell].astype(float)
        norm = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
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
    if not report.importances:
        return None
    fig = Figure(figsize=(6, 2.8), layout="constrained")
    ax = fig.subplots()
    names = list(report.importances)
    ax.barh(names, [report.importances[n] for n in names])
    ax.set_xlabel("importance (Optuna, fANOVA)")
    return _png(fig)


def _html_table(headers: list[str], rows: list[list[str]], spans=()) -> str:
    """A table, the first column left and the others right, ``spans`` (question, columns) a
    header row above naming the question each group of columns answers."""
    esc = html.escape
    above = "".join(
        f"<th colspan={n} class=question>{esc(g)}</th>" if g else f"<th colspan={n}></th>"
        for g, n in spans
    )  # fmt: skip
    head = (f"<tr>{above}</tr>" if above else "") + "<tr>" + "".join(
        f"<th>{esc(h)}</th>" for h in headers
    ) + "</tr>"  # fmt: skip
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(t)}</td>" if i == 0 else f"<td class=num>{esc(t)}</td>"
                         for i, t in enumerate(row)) + "</tr>"
        for row in rows
    )  # fmt: skip
    return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"


def _best_html(best: pd.DataFrame) -> str:
    headers = ["Sampled parameters", "Best validation accuracy (%)", "Test accuracy (%)"]
    rows = [[params, _num(100 * val), _num(100 * test)]
            for params, val, test in best.itertuples(index=False)]  # fmt: skip
    return _html_table(headers, rows)


def to_html(report: StudyReport) -> str:
    def img(data: bytes | None, alt: str) -> str:
        if data is None:
            return ""
        encoded = base64.b64encode(data).decode()
        return f'<figure><img alt="{alt}" src="data:image/png;base64,{encoded}"><figcaption>{alt}</figcaption></figure>'  # noqa: E501

    esc = html.escape
    cols, rows = _cells(report)
    spans = _spans(cols)
    table = [
        _html_table([c.header for c in cols], rows, spans if len(spans) > 1 else ()),
        "<h3>Legend</h3><dl class=legend>" + "".join(
            f"<dt>{esc(name)}</dt><dd>{esc(meaning)}.</dd>"
            for name, meaning in _full_legend(report)
        ) + "</dl>",
    ] if rows else ["<p>no finished trials</p>"]  # fmt: skip
    parts = [
        f"<h1>{esc(': '.join(filter(None, (report.study, report.description))))}</h1>",
        f"<p>dataset <b>{esc(report.dataset)}</b>, session <code>{esc(report.session)}</code>, "
        f"reference <b>{esc(str(report.reference))}</b></p>",
        "<h2>Test accuracy per cell</h2>",
        *table,
        f"<p class=method>Statistics: {esc(report.method)}.</p>",
        "<h2>Cost</h2>",
        "".join(f"<p>{esc(line)}</p>" for line in _cost_lines(report)),
        img(_confusion_figure(report), "confusion matrices (test, rows normalised, all trials)"),
        img(_curves_figure(report), "validation accuracy per epoch"),
        img(report.distribution_png, "class distribution of the training split"),
    ]
    if report.best is not None:
        parts += ["<h2>Best configurations</h2>", _best_html(report.best)]
        parts.append(img(_importance_figure(report), "parameter importances"))
    style = ("body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:"
             "collapse}td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px}"
             "td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}"
             "img{max-width:100%}figure{margin:1.5em 0}th.question{background:#eef}"
             "dl.legend dt{margin-top:.4em;font-weight:bold}"
             "dl.legend dd{margin-left:2em;font-size:13px}")  # fmt: skip
    title = esc(report.study)
    head = f"<meta charset=utf-8><title>{title} report</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"


def write_report(report: StudyReport, folder) -> list[Path]:
    """The readable table (terminal text, Markdown, LaTeX, the HTML page) and the data (the
    table's raw columns and the trials as CSV) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"study_table.md": markdown_table(report), "study_table.txt": format_table(report),
             "report.tex": latex_table(report), "report.html": to_html(report)}  # fmt: skip
    paths = [folder / "study_table.csv", folder / "trials.csv", *(folder / n for n in texts)]
    report.table.to_csv(paths[0], index=False)
    report.trials.to_csv(paths[1], index=False)
    for name, text in texts.items():
        (folder / name).write_text(text + "\n")
    return paths


def find_session(tracker: StudyTracker, study: str | None = None, run_id: str | None = None):
    """The session of a parent run id, or the latest session of a study in its experiment."""
    if run_id:
        return tracker.client.get_run(run_id).data.tags[SESSION_TAG]
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.{PARENT_TAG} = 'true'",
        order_by=["start_time DESC"], max_results=1,
    )  # fmt: skip
    if not runs:
        raise ValueError(f"study {study!r} has no runs in this store")
    return runs[0].data.tags[SESSION_TAG]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import sys

    from fermodel.cli import OneLineParser

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from orchestrate.tracking import TrackingError, check_reachable, default_tracking_uri

    parser = OneLineParser(
        prog="python -m orchestrate.report",
        description="Rebuild a study's report (table, statistics, figures, cost) from MLflow "
        "alone, without re-running anything.",
        epilog="examples:\n  python -m orchestrate.report --study table4\n"
        "  python -m orchestrate.report --run 3f2a... --out reports/table4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="study name: its latest session in the store")
    which.add_argument("--run", help="the id of a parent run: its session (with its resumes)")
    parser.add_argument("--tracking-uri", help="MLflow store (default as for the ablation)")
    parser.add_argument("--out", type=Path, help="folder for the files (default reports/<session>)")
    args = parser.parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # imported with this module already
    uri = args.tracking_uri or default_tracking_uri()
    try:
        check_reachable(uri)
        store = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if store is not None and not store.is_file():  # do not create an empty store
            raise ValueError(f"no MLflow store at {store}")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if args.run:
            experiment = client.get_experiment(client.get_run(args.run).info.experiment_id).name
        else:
            experiment = args.study
            if client.get_experiment_by_name(experiment) is None:
                raise ValueError(f"study {experiment!r} has no experiment in {uri}")
        tracker = StudyTracker(uri, experiment)
        session = find_session(tracker, args.study, args.run)
        report = build_report(tracker, session)
    except (ValueError, KeyError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # an unknown run id: MLflow raises its own exception types
        print(f"error: {err.__class__.__name__}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    folder = args.out or Path("reports") / session
    paths = write_report(report, folder)
    print(format_table(report))
    print(f"\nwritten: {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
