"""A study session as plain data, read from MLflow once: what the report needs, nothing of MLflow.

``collect(tracker, session)`` downloads what ``orchestrate.report.build_report`` reads: the study
file logged on the session's first parent run, one row per trial (tags, status, the params the
report states, final metrics), each finished trial's test predictions and validation curve, and
the class-distribution figure. Everything after this is pure functions of a ``StudyData``.
"""

from __future__ import annotations

import json
import math
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

STUDY_ARTIFACT = "study.toml"
DISTRIBUTION_ARTIFACT = "class_distribution.png"
PREDICTIONS_ARTIFACT = "predictions.json"
# trial-config params the report states (its title, the fold correction)
STATED_PARAMS = ("loss", "lam", "lam1", "protocol", "folds", "drop_leaked", "clean",
                 "drop_mislabeled", "labels")  # fmt: skip


@dataclass
class StudyData:
    study: str
    session: str
    dataset: str
    meta: dict  # the study file as logged on the parent run ({} if absent)
    trials: pd.DataFrame  # one row per trial of the session
    preset: str = ""
    gpus_per_trial: float = 0.0
    predictions: dict[str, dict] = field(default_factory=dict)  # run id -> predictions.json
    curves: dict[str, list[float]] = field(default_factory=dict)  # run id -> val accuracy/epoch
    distribution_png: bytes | None = None

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "grid")

    @property
    def finished(self) -> pd.DataFrame:
        """The trials that finished with test figures."""
        t = self.trials
        if not len(t) or "test_accuracy" not in t:
            return t.iloc[:0]
        return t[(t.status == "FINISHED") & t.test_accuracy.notna()]


def session_frame(tracker, session: str) -> pd.DataFrame:
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
                **{k: params.get(k, "") for k in STATED_PARAMS},
                **{k: v for k, v in metrics.items() if k.startswith(("test_", "best_"))},
                **{k: metrics.get(k, math.nan)
                   for k in ("train_seconds", "trial_seconds", "mean_images_per_second",
                             "train_images", "test_images")},
            }
        )  # fmt: skip
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.drop_duplicates("trial", keep="last").reset_index(drop=True)


def _artifact(tracker, run_id: str, name: str, folder: str) -> Path | None:
    try:
        return Path(tracker.client.download_artifacts(run_id, name, folder))
    except Exception:  # absent artifact: MLflow raises store-specific errors
        return None


def collect(tracker, session: str) -> StudyData:
    """Everything the report of ``session`` reads, from the tracker's MLflow store."""
    parents = sorted(tracker.session_runs(session, parents=True), key=lambda r: r.info.start_time)
    if not parents:
        raise ValueError(f"no parent run of study session {session!r} in this store")
    first = parents[0]
    data = StudyData(
        study=first.data.tags.get("study", ""),
        session=session,
        dataset=first.data.params.get("dataset", ""),
        meta={},
        trials=session_frame(tracker, session),
        preset=first.data.params.get("preset", ""),
        gpus_per_trial=float(first.data.params.get("gpus_per_trial", 0) or 0),
    )
    with tempfile.TemporaryDirectory(prefix="fer-report-") as folder:
        for parent in parents:
            path = _artifact(tracker, parent.info.run_id, STUDY_ARTIFACT, folder)
            if path is not None:
                data.meta = tomllib.loads(path.read_text())
                break
        data.meta.setdefault("kind", first.data.tags.get("kind", "grid"))
        for run_id in data.finished.run_id:
            path = _artifact(tracker, run_id, PREDICTIONS_ARTIFACT, folder)
            if path is not None:
                data.predictions[run_id] = json.loads(path.read_text())
        for parent in parents:
            png = _artifact(tracker, parent.info.run_id, DISTRIBUTION_ARTIFACT, folder)
            if png is not None:
                data.distribution_png = png.read_bytes()
                break
    for run_id in data.finished.run_id:
        history = tracker.client.get_metric_history(run_id, "val_accuracy")
        data.curves[run_id] = [m.value for m in sorted(history, key=lambda m: m.step)]
    return data
