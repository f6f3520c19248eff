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
observed one). ``LEGEND_*`` say what every column means; the Markdown and HTML pages print them
below the table. Tuning studies get the best configs, Optuna's parameter importances, and the
compute that ASHA's early stopping saved. Outputs: the terminal table, Markdown, CSV and one
self-contained HTML page with the figures, all logged to the parent run.

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
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

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

# the two questions' columns, in table order; "testset_" answers "on this test set", "runs_"
# (and seeds_needed) "across training runs"
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
COUNT_COLUMNS = {"trials", "testset_n", "runs_n", "seeds_needed"}
P_COLUMNS = {"testset_p_holm", "runs_p_holm"}

# what each column of the study table means: printed below the table (Markdown, HTML) and
# summarised under the terminal table; the README's "The study report" says the same
LEGEND_CELL = [
    ("trials", "finished trials of the cell (seeds x folds)"),
    (
        "accuracy, std, ci95_low, ci95_high",
        "mean test accuracy (%) over the cell's trials, "
        "its sample standard deviation (run-to-run spread) and the 95% Student-t interval of the "
        "mean",
    ),
    ("macro_f1, paper", "mean macro F1 (%); the paper's accuracy for this cell and dataset"),
]
LEGEND_COMPARISON = [
    ("testset_*", "ON THIS TEST SET: do these trained models differ on these test images? "
     "Paired against the reference cell on the same images, each image's correctness averaged "
     "over seeds first. Says nothing about another training seed"),
    ("testset_unit, testset_n", "the independent unit that is resampled and how many there "
     "are: the subject where the predictions name one (CK+, synthetic: the frames and "
     "sequences of one person are not independent), else the image (FER2013)"),
    ("testset_diff", "cell minus reference accuracy on the shared test images (points)"),
    ("testset_ci_low, testset_ci_high", "95% percentile bootstrap interval resampling whole "
     "units (a cluster bootstrap over subjects)"),
    ("testset_p_holm", "two-sided sign-flip permutation test over units (the datum of a unit is "
     "the sum of its images' differences), Holm-adjusted across cells"),
    ("testset_significant", f"yes when testset_p_holm < {ALPHA}"),
    ("testset_mde", f"noise floor: the smallest difference this test detects with "
     f"{POWER:.0%} power at two-sided {ALPHA} with these units, "
     "(z_0.975 + z_0.80) x sqrt(sum of squared unit sums) / images; on images with one seed "
     "the paired-proportions (McNemar) normal approximation with the observed discordant "
     "share, (z_0.975 + z_0.80) x sqrt(discordant share / images)"),
    ("runs_*", "ACROSS TRAINING RUNS: does the gain survive another seed? The cell's trials "
     "against the reference's trials with the same seed and fold"),
    ("runs_n", "paired (seed, fold) runs K"),
    ("runs_diff, runs_ci_low, runs_ci_high", "mean over the K runs of cell minus reference "
     "test accuracy (points) and its 95% Student-t interval"),
    ("runs_p_holm", "paired t-test over the K runs, Holm-adjusted across cells separately "
     "from testset_p_holm"),
    ("runs_significant", f"yes when runs_p_holm < {ALPHA}; 'n/a: 1 seed x 1 fold' when "
     "there is one paired run: without run-to-run spread this cannot be judged"),
    ("runs_sd", "standard deviation of the K paired run differences (the gain's run-to-run "
     "noise)"),
    ("runs_mde", f"noise floor: the smallest mean difference a paired t-test over K runs "
     f"detects with {POWER:.0%} power at two-sided {ALPHA}, "
     "(t_0.975,K-1 + t_0.80,K-1) x runs_sd / sqrt(K)"),
    ("seeds_needed", "seeds (each with this study's folds) at which runs_mde falls to "
     "|runs_diff|: to detect the observed difference with 80% power given runs_sd; inf when "
     "runs_diff is 0"),
]  # fmt: skip


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


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _num(v, fmt: str = "6.2f") -> str:
    return "" if _missing(v) else format(v, fmt)


def _text(column: str, value) -> str:
    """A table value as the Markdown and HTML pages print it (CSV keeps full precision)."""
    if _missing(value):
        return ""
    if not isinstance(value, float):
        return str(value)
    if column in COUNT_COLUMNS:
        return _num(value, ".0f")
    return _num(value, ".4f" if column in P_COLUMNS else ".2f")


def _compared(report: StudyReport) -> pd.DataFrame:
    """The rows that were compared with the reference."""
    t = report.table
    if not len(t) or "testset_diff" not in t:
        return t.iloc[:0]
    return t[t.testset_diff.notna()]


def _diff_ci(diff: float, low: float, high: float, mark: bool) -> str:
    if math.isnan(diff):
        return ""
    text = f"{diff:+.2f}" + ("" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]")
    return text + (" *" if mark else "  ")


def legend(report: StudyReport) -> list[tuple[str, str]]:
    """(columns, meaning) for the columns of this report's table."""
    return LEGEND_CELL + (LEGEND_COMPARISON if len(_compared(report)) else [])


def format_table(report: StudyReport) -> str:
    t = report.table
    header = (
        f"{'cell':26s} {'n':>3s} {'acc %':>6s} {'std':>5s} {'95% CI':>13s} "
        f"{'F1 %':>6s} {'paper':>6s}"
    )
    lines = [header]
    for row in t.itertuples():
        ci = f"{_num(row.ci95_low, '.2f')}-{_num(row.ci95_high, '.2f')}" if row.trials > 1 else ""
        lines.append(
            f"{row.cell[:26]:26s} {row.trials:3d} {_num(row.accuracy)} {_num(row.std, '5.2f'):>5s} "
            f"{ci:>13s} {_num(row.macro_f1)} {_num(row.paper):>6s}"
        )
    compared = _compared(report)
    if len(compared):
        unit = next(u for u in compared.testset_unit if u)
        testset = f"on this test set (unit: {unit})"
        lines += [
            "",
            f"{'vs ' + str(report.reference):26s} {testset:48s} | across training runs",
            f"{'cell':26s} {'diff vs ref [95% CI]':>24s} {'p Holm':>7s} {'MDE':>6s} "
            f"{'units':>8s} | {'diff vs ref [95% CI]':>24s} {'p Holm':>7s} {'MDE':>6s} "
            f"{'seeds':>6s}",
        ]
        for row in compared.itertuples():
            test = _diff_ci(row.testset_diff, row.testset_ci_low, row.testset_ci_high,
                            row.testset_significant == "yes")  # fmt: skip
            line = (
                f"{row.cell[:26]:26s} {test:>24s} {_num(row.testset_p_holm, '7.4f'):>7s} "
                f"{_num(row.testset_mde, '6.2f'):>6s} {_num(row.testset_n, '8.0f'):>8s} | "
            )
            runs = _diff_ci(row.runs_diff, row.runs_ci_low, row.runs_ci_high,
                            row.runs_significant == "yes")  # fmt: skip
            if row.runs_significant.startswith("n/a"):  # no p-value: cannot be judged
                line += f"{runs:>24s} {row.runs_significant}"
            else:
                line += (
                    f"{runs:>24s} {_num(row.runs_p_holm, '7.4f'):>7s} "
                    f"{_num(row.runs_mde, '6.2f'):>6s} {_num(row.seeds_needed, '6.0f'):>6s}"
                )
            lines.append(line.rstrip())
        lines += [
            f"on this test set: do these trained models differ on these images? (bootstrap CI "
            f"and sign-flip p over {unit}s)",
            "across training runs: does the gain survive another seed? (paired t-test over "
            "(seed, fold) runs)",
            f"p Holm-adjusted per question, * below {ALPHA}; MDE: smallest difference detectable "
            f"with {POWER:.0%} power;",
            f"seeds: seeds needed to detect the observed diff with {POWER:.0%} power "
            "(every column: study_table.md, report.html)",
        ]
    if report.reference:
        lines.append(f"reference: {report.reference}; * significant at {ALPHA} after Holm")
    c = report.cost
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
    return "\n".join(lines)


def markdown_table(report: StudyReport) -> str:
    """The table as Markdown, with the legend of its columns below it."""
    cols = [c for c in report.table.columns if c != "key"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report.table[cols].itertuples(index=False):
        cells = [_text(c, v) for c, v in zip(cols, row, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Columns (accuracies and differences in percentage points):", ""]
    lines += [f"- `{names}`: {meaning}." for names, meaning in legend(report)]
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


def to_html(report: StudyReport) -> str:
    def img(data: bytes | None, alt: str) -> str:
        if data is None:
            return ""
        encoded = base64.b64encode(data).decode()
        return f'<figure><img alt="{alt}" src="data:image/png;base64,{encoded}"><figcaption>{alt}</figcaption></figure>'  # noqa: E501

    def table_html(frame: pd.DataFrame, questions: bool = False) -> str:
        head = "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        head += "</tr>"
        if questions:  # a row above naming the question each group of columns answers
            spans: list[list] = []
            for c in frame.columns:
                group = c.split("_")[0] if c.startswith(("testset_", "runs_")) else ""
                group = "runs" if c == "seeds_needed" else group
                if spans and spans[-1][0] == group:
                    spans[-1][1] += 1
                else:
                    spans.append([group, 1])
            head = "<tr>" + "".join(
                f"<th colspan={n} class=question>{html.escape(QUESTIONS[g])}</th>"
                if g
                else f"<th colspan={n}></th>"
                for g, n in spans
            ) + "</tr>" + head  # fmt: skip
        body = "".join(
            "<tr>" + "".join(
                f"<td>{html.escape(_text(c, v))}</td>"
                for c, v in zip(frame.columns, row, strict=True)
            ) + "</tr>"
            for row in frame.itertuples(index=False)
        )  # fmt: skip
        return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"

    legend_html = "<dl class=legend>" + "".join(
        f"<dt><code>{html.escape(names)}</code></dt><dd>{html.escape(meaning)}.</dd>"
        for names, meaning in legend(report)
    ) + "</dl>"  # fmt: skip

    cols = [c for c in report.table.columns if c != "key"]
    parts = [
        f"<h1>{html.escape(report.study)}: {html.escape(report.description)}</h1>",
        f"<p>dataset <b>{html.escape(report.dataset)}</b>, session "
        f"<code>{html.escape(report.session)}</code>, reference "
        f"<b>{html.escape(str(report.reference))}</b></p>",
        "<h2>Test accuracy per cell (%)</h2>",
        table_html(report.table[cols], questions=True)
        if len(report.table)
        else "<p>no finished trials</p>",
        "<h3>What the columns mean</h3><p>Accuracies and differences in percentage points.</p>"
        if len(report.table)
        else "",
        legend_html if len(report.table) else "",
        f"<p class=method>Statistics: {html.escape(report.method)}.</p>",
        "<h2>Cost</h2>",
        table_html(pd.DataFrame([report.cost])),
        img(_confusion_figure(report), "confusion matrices (test, rows normalised, all trials)"),
        img(_curves_figure(report), "validation accuracy per epoch"),
        img(report.distribution_png, "class distribution of the training split"),
    ]
    if report.best is not None:
        parts += ["<h2>Best configurations</h2>", table_html(report.best)]
        parts.append(img(_importance_figure(report), "parameter importances"))
    style = ("body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:"
             "collapse}td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px}"
             "img{max-width:100%}figure{margin:1.5em 0}th.question{background:#eef}"
             "dl.legend dt{margin-top:.4em}"
             "dl.legend dd{margin-left:2em;font-size:13px}")  # fmt: skip
    title = html.escape(report.study)
    head = f"<meta charset=utf-8><title>{title} report</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(parts)}</body></html>"


def write_report(report: StudyReport, folder) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "study_table.csv", folder / "study_table.md", folder / "study_table.txt",
             folder / "report.html", folder / "trials.csv"]  # fmt: skip
    report.table.to_csv(paths[0], index=False)
    paths[1].write_text(markdown_table(report) + "\n")
    paths[2].write_text(format_table(report) + "\n")
    paths[3].write_text(to_html(report))
    report.trials.to_csv(paths[4], index=False)
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
