"""The study's table, built from MLflow alone: one row per cell, accuracy over seeds and folds.

Rows come from the FINISHED child runs of one study session (an invocation and its resumes),
each trial counted once. Accuracy is in percent; the 95% confidence interval of the mean uses
Student's t over the trials of the cell (scipy). The paper's number for the cell and dataset
stands beside it when the study file gives one.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from orchestrate.tracking import StudyTracker


def session_frame(tracker: StudyTracker, session: str) -> pd.DataFrame:
    """One row per trial of the session: its tags, status and final metrics."""
    rows = []
    for run in tracker.session_runs(session):
        tags, metrics = run.data.tags, run.data.metrics
        rows.append(
            {
                "run_id": run.info.run_id,
                "status": run.info.status,
                "cell": tags.get("cell", ""),
                "seed": int(tags.get("seed", 0)),
                "fold": int(tags.get("fold", 0)),
                "trial": tags.get("ray_trial_id", ""),
                "stopped_early": tags.get("stopped_early") == "true",
                "error": tags.get("error", ""),
                **{k: v for k, v in metrics.items() if k.startswith(("test_", "best_"))},
                **{
                    k: metrics.get(k, math.nan)
                    for k in ("train_seconds", "trial_seconds", "mean_images_per_second")
                },
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    # a trial picked up again by a resume keeps one run; keep its latest state if ever two
    return frame.drop_duplicates("trial", keep="last").reset_index(drop=True)


def study_table(frame: pd.DataFrame, study, dataset: str) -> pd.DataFrame:
    """Per cell (in study order): trials, mean, std and 95% CI of test accuracy (%), macro F1,
    the paper's number."""
    if "test_accuracy" not in frame:
        frame = frame.assign(test_accuracy=math.nan, test_macro_f1=math.nan, cell="", status="")
    done = frame[(frame.status == "FINISHED") & frame.test_accuracy.notna()]
    cells = study.cells if study.kind == "grid" else ()
    labels = {c.name: c.label for c in cells}
    paper = {c.name: c.paper.get(dataset) for c in cells}
    order = [c.name for c in cells] or sorted(done.cell.unique())
    rows = []
    for cell in order:
        acc = 100 * done.loc[done.cell == cell, "test_accuracy"].to_numpy(dtype=float)
        f1 = 100 * done.loc[done.cell == cell, "test_macro_f1"].to_numpy(dtype=float)
        n = len(acc)
        mean = acc.mean() if n else math.nan
        std = acc.std(ddof=1) if n > 1 else math.nan
        half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        rows.append(
            {
                "cell": labels.get(cell, cell),
                "trials": n,
                "accuracy": mean,
                "std": std,
                "ci95_low": mean - half,
                "ci95_high": mean + half,
                "macro_f1": f1.mean() if n else math.nan,
                "paper": paper.get(cell) if paper.get(cell) is not None else math.nan,
            }
        )
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame) -> str:
    lines = [f"{'cell':28s} {'n':>3s} {'accuracy %':>11s} {'std':>6s} {'95% CI':>15s} "
             f"{'macro F1':>8s} {'paper':>6s}"]  # fmt: skip
    for row in table.itertuples():
        ci = "" if math.isnan(row.ci95_low) else f"{row.ci95_low:6.2f}-{row.ci95_high:6.2f}"
        std = "" if math.isnan(row.std) else f"{row.std:6.2f}"
        paper = "" if math.isnan(row.paper) else f"{row.paper:6.2f}"
        lines.append(
            f"{row.cell[:28]:28s} {row.trials:3d} {row.accuracy:11.2f} {std:>6s} {ci:>15s} "
            f"{row.macro_f1:8.2f} {paper:>6s}"
        )
    return "\n".join(lines)
