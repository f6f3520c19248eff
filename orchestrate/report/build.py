"""The study report: per-cell accuracies and the study's contrasts, with honest statistics.

``build_report(StudyData)`` is a pure function of what ``orchestrate.report.collect`` read from
MLflow (the FINISHED child runs of one study session, each trial counted once). Per cell: test
accuracy over seeds and folds (mean, std, 95% t interval, corrected for overlapping training sets on
k-fold CV), macro F1, per-class recall, the accuracy on the whole test split where leaked images
were dropped from it, the paper's number, and the cost. Per contrast (the study file's
``[[contrasts]]``, or every cell against the reference): two questions answered apart
(``orchestrate.report.statistics``), each Holm-adjusted within the contrast's family on its
own, with their noise floors. Tuning studies get the best configs, Optuna's parameter importances
and what ASHA's early stopping saved. ``orchestrate.report.render`` prints it (terminal,
Markdown, LaTeX, HTML).

``python -m orchestrate.report --study NAME`` (or ``--run PARENT_ID``) rebuilds it without
re-running anything.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrate.report.collect import COST_METRICS, StudyData
from orchestrate.report.pareto import dominators, on_front
from orchestrate.report.statistics import (
    ALPHA,
    KFOLD_TEST,
    REPEATED_TEST,
    Predictions,
    check_weights,
    compare,
    holm,
    summarize_runs,
)
from orchestrate.report.study_report import StudyReport
from orchestrate.report.tuning import selected_test_only, tuning_report

# the contrasts' raw columns (the CSV's): "testset_" answers "on this test set", "runs_" (and
# seeds_needed) "across training runs"
TESTSET_COLUMNS = [
    "testset_unit",
    "testset_n",
    "testset_diff",
    "testset_ci_low",
    "testset_ci_high",
    "testset_p",
    "testset_p_exact",
    "testset_p_error",
    "testset_p_holm",
    "testset_significant",
    "testset_mde",
    "testset_note",
]
RUNS_COLUMNS = [
    "runs_test",
    "runs_n",
    "runs_seeds",
    "runs_folds",
    "runs_repetitions",
    "runs_units",
    "runs_fold_ratio",
    "runs_diff",
    "runs_ci_low",
    "runs_ci_high",
    "runs_p",
    "runs_p_holm",
    "runs_significant",
    "runs_sd",
    "runs_mde",
    "seeds_needed",
    "runs_p_by_correlation",
]
CONTRAST_COLUMNS = ["family", "comparison", "plus", "minus", *TESTSET_COLUMNS, *RUNS_COLUMNS]

# the paper's own protocol per dataset, said where the study's differs (the paper column's note)
PAPER_PROTOCOL = {
    "ckplus": (
        "paper",
        "the paper's CK+ numbers come from its own split (4 random frames of "
        "each sequence with augmented copies, split 2:1 per class), which puts frames of "
        "one subject and copies of one image on both sides; they are not comparable "
        "with subject-independent folds",
    ),
    "fer2013": (
        "official",
        "the paper's FER2013 numbers are on its test set (PrivateTest) in "
        "full: compare them with Full test (%), not with the deduplicated accuracy",
    ),
}


def fold_ratio(trials: pd.DataFrame) -> float:
    """The test/train size ratio of the trials' folds (NaN where the sizes were not logged)."""
    if "train_images" not in trials or "test_images" not in trials:
        return math.nan
    ratios = trials.test_images / trials.train_images
    return float(ratios.mean()) if len(trials) and ratios.notna().all() else math.nan


def split_unit(row) -> int:
    """A trial's split as the statistics count it: its fold, numbered on across the drawings of
    repeated k-fold (repetition r's fold f is r * k + f)."""
    repetition = int(getattr(row, "repetition", 0) or 0)
    return repetition * int(getattr(row, "folds", 0) or 0) + int(row.fold)


def repetitions(trials: pd.DataFrame) -> int:
    """How many drawings of the folds the trials span (1: one split)."""
    return int(trials.repetition.nunique()) if "repetition" in trials and len(trials) else 1


def _cell_predictions(data: StudyData, trials: pd.DataFrame) -> list[Predictions]:
    out = []
    for row in trials.itertuples():
        p = data.predictions.get(row.run_id)
        if p is not None:  # "groups" (each test image's subject) is absent in older artifacts
            out.append(
                Predictions(
                    row.seed,
                    split_unit(row),
                    p["ids"],
                    p["labels"],
                    p["predictions"],
                    p.get("groups"),
                )
            )
    return out


def cell_rows(data: StudyData, order: list[str], labels: dict, paper: dict) -> pd.DataFrame:
    done = data.finished
    rows = []
    for cell in order:
        sub = done[done.cell == cell]
        several_folds = sub.fold.nunique() > 1
        ratio = fold_ratio(sub) if several_folds else 0.0
        accuracies = {(r.seed, split_unit(r)): 100 * r.test_accuracy for r in sub.itertuples()}
        acc = summarize_runs(accuracies, ratio if math.isfinite(ratio) else 0.0)
        if several_folds and not math.isfinite(ratio):
            acc["ci_low"] = acc["ci_high"] = math.nan  # no sizes logged: no honest interval
        hours = sub.trial_seconds.sum() / 3600
        full = sub.get("test_full_accuracy", pd.Series(dtype=float))
        row = {
            "cell": labels.get(cell, cell),
            "key": cell,
            "trials": acc["n"],
            "accuracy": acc["mean"],
            "std": acc["std"],
            "ci95_low": acc["ci_low"],
            "ci95_high": acc["ci_high"],
            "fold_ratio": ratio if several_folds else math.nan,
            "macro_f1": 100 * sub.test_macro_f1.mean() if len(sub) else math.nan,
            "full_accuracy": 100 * full.mean() if full.notna().any() else math.nan,
            "paper": paper.get(cell, math.nan),
            "trial_hours": hours,
            "gpu_hours": hours * data.gpus_per_trial,
            "images_per_second": sub.mean_images_per_second.mean() if len(sub) else math.nan,
        }
        for col in COST_METRICS:  # the cell's architecture on the trials' device
            row[col] = _architecture_cost(done, sub, col)
        for col in sorted(c for c in sub.columns if c.startswith("test_recall_")):
            row[col.replace("test_", "")] = 100 * sub[col].mean()
        rows.append(row)
    return _front(pd.DataFrame(rows))


def _architecture_cost(done: pd.DataFrame, cell: pd.DataFrame, col: str) -> float:
    """A cell's cost figure: the median over every finished trial of its architecture, so that
    cells sharing one (table4's loss cells) show one latency, not two timings' noise."""
    if col not in cell or not len(cell):
        return math.nan
    keys = [k for k in ("backbone", "attention") if k in done and cell[k].nunique() == 1]
    same = done
    for key in keys:
        same = same[same[key] == cell[key].iloc[0]]
    return float(same[col].median()) if keys and len(same) else float(cell[col].median())


FRONT = [("accuracy", "max"), ("latency_ms", "min")]  # what a deployment trades


def _front(table: pd.DataFrame) -> pd.DataFrame:
    """Each cell's place against the others on accuracy and latency: on the Pareto front, or
    dominated (by which cells); left empty unless two cells or more have both figures."""
    table["front"], table["dominated_by"] = None, ""
    known = table[table.accuracy.notna() & table.latency_ms.notna()] if len(table) else table
    if len(known) < 2:
        return table
    points = known[[m for m, _ in FRONT]].to_numpy()
    front = on_front(points, FRONT)
    for index, on, by in zip(known.index, front, dominators(points, FRONT), strict=True):
        table.at[index, "front"] = bool(on)
        table.at[index, "dominated_by"] = ", ".join(known.cell.iloc[i] for i in by)
    return table


def _verdict(p: float) -> str:
    return "yes" if p < ALPHA else "no"


def contrast_rows(data: StudyData, contrasts, n_resamples: int = 10_000) -> pd.DataFrame:
    """Both questions for every contrast, Holm-adjusted within each family and question."""
    done = data.finished
    rows = []
    for contrast in contrasts:
        weights = contrast.weights
        check_weights(weights)
        row = {
            "family": contrast.family,
            "comparison": contrast.label,
            "plus": " + ".join(contrast.plus),
            "minus": " + ".join(contrast.minus),
        }
        involved = done[done.cell.isin(list(weights))]
        cells = {c: _cell_predictions(data, involved[involved.cell == c]) for c in weights}
        missing = [c for c, p in cells.items() if not p]
        if missing:
            row["runs_significant"] = f"n/a: no finished trials of {missing[0]}"
            rows.append(row)
            continue
        try:
            result = compare(
                cells,
                weights,
                fold_ratio(involved),
                n_resamples=n_resamples,
                repetitions=repetitions(involved),
            )
        except ValueError as err:  # no shared runs or images, or no fold sizes logged
            row["runs_significant"] = f"n/a: {err}"
            rows.append(row)
            continue
        t, r = result["test_set"], result["runs"]
        row.update(
            {
                "testset_unit": t["unit"],
                "testset_n": t["n_units"],
                "testset_diff": t["difference"],
                "testset_ci_low": t["ci_low"],
                "testset_ci_high": t["ci_high"],
                "testset_p": t["p_value"],
                "testset_p_exact": t["p_exact"],
                "testset_p_error": t["p_error"],
                "testset_mde": t["mde"],
                "testset_note": t["note"],
                "runs_test": (REPEATED_TEST if r["repetitions"] > 1 else KFOLD_TEST)
                if r["corrected"]
                else "paired t",
                "runs_n": r["n_runs"],
                "runs_seeds": r["n_seeds"],
                "runs_folds": r["n_folds"],
                "runs_repetitions": r["repetitions"],
                "runs_units": r["n_units"],
                "runs_fold_ratio": r["fold_ratio"],
                "runs_diff": r["difference"],
                "runs_ci_low": r["ci_low"],
                "runs_ci_high": r["ci_high"],
                "runs_p": r["p_value"],
                "runs_sd": r["sd"],
                "runs_mde": r["mde"],
                "seeds_needed": r["seeds_needed"],
                "runs_p_by_correlation": "; ".join(
                    f"{rho:.3g}: {p:.4g}" for rho, p in r["p_by_correlation"].items()
                ),
                "runs_significant": "" if r["judged"] else r["note"],
            }
        )
        rows.append(row)
    frame = pd.DataFrame(rows, columns=CONTRAST_COLUMNS)
    for family in frame.family.unique():
        at = frame.index[frame.family == family]
        for question in ("testset", "runs"):
            frame.loc[at, f"{question}_p_holm"] = holm(frame.loc[at, f"{question}_p"].astype(float))
    frame["testset_significant"] = [
        _verdict(p) if not math.isnan(p) else "" for p in frame.testset_p_holm.astype(float)
    ]
    frame["runs_significant"] = [
        note if isinstance(note, str) and note else (_verdict(p) if not math.isnan(p) else "")
        for note, p in zip(frame.runs_significant, frame.runs_p_holm.astype(float), strict=True)
    ]
    # counts stay integers in the CSV, with an empty cell where a contrast was not computed
    return frame.astype(
        {
            "testset_n": "Int64",
            "runs_n": "Int64",
            "runs_seeds": "Int64",
            "runs_folds": "Int64",
            "runs_units": "Int64",
            "runs_repetitions": "Int64",
        }
    )


def _values(trials: pd.DataFrame, column: str) -> list[str]:
    if column not in trials:
        return []
    return sorted({str(v) for v in trials[column] if str(v) not in ("", "nan")})


def describe_setup(data: StudyData) -> str:
    """The title's facts: the dataset, its protocol, the loss weights and how leaks were
    handled, read from the trials' logged configs."""
    t = data.finished if len(data.finished) else data.trials
    preset = f" (preset {data.preset})" if data.preset not in ("", "None") else ""
    parts = [f"{data.study} on {data.dataset}{preset}: test accuracy"]
    protocol = _values(t, "protocol")
    if protocol == ["kfold"]:
        folds = _values(t, "folds")
        drawn = repetitions(t)
        again = f", its folds drawn {drawn} times (repeated k-fold)" if drawn > 1 else ""
        parts.append(f"subject-independent {'/'.join(folds)}-fold cross-validation{again}")
    elif protocol == ["official"]:
        parts.append("the dataset's own train / validation / test split")
    elif protocol == ["paper"]:
        parts.append("the paper's 2:1 split (one subject's frames on both sides)")
    joint = t[t["loss"].isin(["island", "center"])] if "loss" in t else t.iloc[:0]
    weights = sorted({(r.loss, str(r.lam), str(r.lam1)) for r in joint.itertuples()})
    if data.kind == "tune":  # each trial samples its own: the trials table shows them
        weights = []
        parts.append("hyperparameters sampled per trial")
    for loss, lam, lam1 in weights:
        extra = f", lam1 {lam1}" if loss == "island" else ""
        parts.append(f"{loss} loss lam {lam}{extra}")
    leaks = _values(t, "drop_leaked")
    if leaks == ["True"]:
        parts.append(
            "leaked images dropped (validation: copies in train or test; test: copies in train)"
        )
    elif leaks == ["False"]:
        parts.append("leaked images kept")
    return "; ".join(parts)


def _paper_note(data: StudyData, table: pd.DataFrame) -> str:
    if "paper" not in table or not table.paper.notna().any() or data.dataset not in PAPER_PROTOCOL:
        return ""
    protocol, note = PAPER_PROTOCOL[data.dataset]
    used = _values(data.finished, "protocol")
    if data.dataset == "fer2013":
        return note if table.full_accuracy.notna().any() else ""
    return note if used and used != [protocol] else ""


def build_report(data: StudyData, n_resamples: int = 10_000) -> StudyReport:
    from search_spaces import study_contrasts

    meta, done = data.meta, data.finished
    cells = meta.get("cells", [])
    labels = {c["name"]: c.get("label", c["name"]) for c in cells}
    paper = {c["name"]: c.get("paper", {}).get(data.dataset, math.nan) for c in cells}
    order = [c["name"] for c in cells] or (sorted(done.cell.unique()) if len(done) else [])
    table = cell_rows(data, order, labels, paper)
    contrasts = pd.DataFrame(columns=CONTRAST_COLUMNS)
    if data.kind == "grid" and cells:
        contrasts = contrast_rows(data, study_contrasts(meta), n_resamples)

    classes = next(iter(data.predictions.values()), {}).get("classes", [])
    confusion, curves = {}, {}
    for cell in order:
        sub = done[done.cell == cell]
        total = np.zeros((len(classes), len(classes)), dtype=int)
        for p in _cell_predictions(data, sub):
            np.add.at(total, (p.labels, p.predictions), 1)
        confusion[labels.get(cell, cell)] = total
        histories = [data.curves[r] for r in sub.run_id if data.curves.get(r)]
        if histories:
            padded = np.full((len(histories), max(map(len, histories))), np.nan)
            for i, h in enumerate(histories):
                padded[i, : len(h)] = h
            curves[labels.get(cell, cell)] = list(np.nanmean(padded, axis=0))
    tuning = None
    if data.kind == "tune" and len(data.trials):
        tuning = tuning_report(data)
    return StudyReport(
        study=data.study,
        description=meta.get("description", ""),
        kind=data.kind,
        dataset=data.dataset,
        session=data.session,
        preset=data.preset,
        title=describe_setup(data),
        table=table,
        contrasts=contrasts,
        trials=data.trials if tuning is None else selected_test_only(data.trials, tuning.best),
        cost=_cost(data.trials, data.gpus_per_trial),
        paper_note=_paper_note(data, table),
        classes=classes,
        confusion=confusion,
        curves=curves,
        tuning=tuning,
        distribution_png=data.distribution_png,
        ignored=data.ignored,
    )


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
        # a stopped trial logged its wall time (Tune's clock), not its training time
        per_epoch = stopped.train_seconds.fillna(stopped.trial_seconds) / stopped.epochs_run
        saved = ((stopped.planned_epochs - stopped.epochs_run).clip(lower=0) * per_epoch).sum()
        full = hours * 3600 + saved
        cost["stopped_early"] = len(stopped)
        cost["saved_hours"] = saved / 3600
        cost["saved_fraction"] = saved / full if full else math.nan
    return cost


def write_report(report: StudyReport, folder) -> list[Path]:
    """The readable tables (terminal text, Markdown, LaTeX, the HTML page) and the data (cells,
    contrasts and trials as CSV) in ``folder``."""
    from orchestrate.report.render import format_table, latex_table, markdown_table, to_html

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rerun = write_rerun(report, folder)
    texts = {
        "study_table.md": markdown_table(report),
        "study_table.txt": format_table(report),
        "report.tex": latex_table(report),
        "report.html": to_html(report),
    }
    data = {
        "study_table.csv": report.table,
        "contrasts.csv": report.contrasts,
        "trials.csv": report.trials,
    }
    if report.tuning is not None:
        data["tuning_trials.csv"] = report.tuning.trials
    paths = [rerun] if rerun else []
    for name, frame in data.items():
        frame.to_csv(folder / name, index=False)
        paths.append(folder / name)
    for name, text in texts.items():
        (folder / name).write_text(text + "\n")
        paths.append(folder / name)
    return paths


def write_rerun(report: StudyReport, folder) -> Path | None:
    """A tuning study's re-run (``orchestrate.report.tuning``) as a study file in ``folder``; the
    report then names the command that runs it."""
    from orchestrate.report.tuning import RERUN_FILE, rerun_command, toml_text

    tuning = report.tuning
    if tuning is None or tuning.rerun_study is None:
        return None
    path = Path(folder) / RERUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(tuning.rerun_study))
    tuning.rerun = rerun_command(path, report.preset)
    return path


def find_session(tracker, study: str | None = None, run_id: str | None = None):
    """The session of a parent run id, or the latest session of a study in its experiment."""
    from orchestrate.store.tracking import PARENT_TAG, SESSION_TAG

    if run_id:
        return tracker.client.get_run(run_id).data.tags[SESSION_TAG]
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.{PARENT_TAG} = 'true'",
        order_by=["start_time DESC"],
        max_results=1,
    )
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
    from orchestrate.report.collect import collect
    from orchestrate.report.render import format_table
    from orchestrate.store.tracking import (
        StudyTracker,
        TrackingError,
        check_reachable,
        default_tracking_uri,
    )

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
        report = build_report(collect(tracker, session))
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
