"""The study report, built from MLflow alone: paper-style table, honest statistics, figures, cost.

Rows come from the FINISHED child runs of one study session (an invocation and its resumes, each
trial counted once). Per cell: test accuracy over seeds and folds (mean, std, 95% t interval),
the paired difference to the reference cell on the same test images with its bootstrap interval
and a sign-flip permutation p-value, Holm-adjusted across cells (``orchestrate.statistics``),
macro F1 and per-class recall, the paper's number, and the cost (trial hours, GPU hours,
images/s). Tuning studies get the best configs, Optuna's parameter importances, and the compute
that ASHA's early stopping saved. Outputs: the terminal table, Markdown, CSV and one
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

from orchestrate.statistics import Predictions, holm, paired_comparison, summarize_accuracies
from orchestrate.tracking import PARENT_TAG, SESSION_TAG, StudyTracker

ALPHA = 0.05
STUDY_ARTIFACT = "study.toml"
DISTRIBUTION_ARTIFACT = "class_distribution.png"


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
            Predictions(row.seed, row.fold, p["ids"], p["labels"], p["predictions"])
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
                comparisons[cell] = paired_comparison(ref, other, n_resamples=n_resamples)
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        keys = [k for k in table.key if k in comparisons]
        adjusted = dict(zip(keys, holm([comparisons[k]["p_value"] for k in keys]), strict=True))
        table["diff"] = [comparisons.get(k, {}).get("difference", math.nan) for k in table.key]
        table["diff_ci_low"] = [comparisons.get(k, {}).get("ci_low", math.nan) for k in table.key]
        table["diff_ci_high"] = [comparisons.get(k, {}).get("ci_high", math.nan)
                                 for k in table.key]  # fmt: skip
        table["p_holm"] = [adjusted.get(k, math.nan) for k in table.key]
        table["significant"] = [
            ("yes" if adjusted[k] < ALPHA else "no") if k in adjusted else "" for k in table.key
        ]
        leading = ["cell", "key", "trials", "accuracy", "std", "ci95_low", "ci95_high", "diff",
                 "diff_ci_low", "diff_ci_high", "p_holm", "significant", "macro_f1",
                 "paper"]  # fmt: skip
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
    method = (
        comparisons[next(iter(comparisons))]["method"]
        if comparisons
        else "no paired comparison (a tuning study, or no reference trials)"
    )
    return StudyReport(
        study=first.data.tags.get("study", ""),
        description=meta.get("description", ""),
        kind=kind,
        dataset=dataset,
        session=session,
        reference=labels.get(reference, reference) if reference else None,
        table=table,
        trials=frame,
        method=f"{method}; p-values Holm-adjusted across cells (Holm 1979), alpha {ALPHA}",
        cost=cost,
        classes=classes,
        confusion={labels.get(k, k): v for k, v in confusion.items()},
        curves={labels.get(k, k): v for k, v in curves.items()},
        best=best,
        importances=importances,
        distribution_png=distribution,
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


def _num(v, fmt: str = "6.2f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(report: StudyReport) -> str:
    t = report.table
    header = (
        f"{'cell':26s} {'n':>3s} {'acc %':>6s} {'std':>5s} {'95% CI':>13s} "
        f"{'diff vs ref [95% CI]':>24s} {'p Holm':>7s} {'F1 %':>6s} {'paper':>6s}"
    )
    lines = [header]
    for row in t.itertuples():
        ci = f"{_num(row.ci95_low, '.2f')}-{_num(row.ci95_high, '.2f')}" if row.trials > 1 else ""
        diff = ""
        if not math.isnan(getattr(row, "diff", math.nan)):
            diff = f"{row.diff:+.2f} [{row.diff_ci_low:+.2f}, {row.diff_ci_high:+.2f}]"
            diff += " *" if row.significant == "yes" else "  "
        lines.append(
            f"{row.cell[:26]:26s} {row.trials:3d} {_num(row.accuracy)} {_num(row.std, '5.2f'):>5s} "
            f"{ci:>13s} {diff:>24s} {_num(getattr(row, 'p_holm', math.nan), '7.4f'):>7s} "
            f"{_num(row.macro_f1)} {_num(row.paper):>6s}"
        )
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
    cols = [c for c in report.table.columns if c != "key"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report.table[cols].itertuples(index=False):
        cells = [_num(v, ".2f") if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
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

    def table_html(frame: pd.DataFrame) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        body = "".join(
            "<tr>" + "".join(
                f"<td>{html.escape(_num(v, '.2f') if isinstance(v, float) else str(v))}</td>"
                for v in row
            ) + "</tr>"
            for row in frame.itertuples(index=False)
        )  # fmt: skip
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    cols = [c for c in report.table.columns if c != "key"]
    parts = [
        f"<h1>{html.escape(report.study)}: {html.escape(report.description)}</h1>",
        f"<p>dataset <b>{html.escape(report.dataset)}</b>, session "
        f"<code>{html.escape(report.session)}</code>, reference "
        f"<b>{html.escape(str(report.reference))}</b></p>",
        "<h2>Test accuracy per cell (%)</h2>",
        table_html(report.table[cols]) if len(report.table) else "<p>no finished trials</p>",
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
             "img{max-width:100%}figure{margin:1.5em 0}")  # fmt: skip
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
