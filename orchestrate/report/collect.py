"""A study session as plain data, read from MLflow once: what the report needs, nothing of MLflow.

``collect(tracker, session)`` downloads what ``orchestrate.report.build.build_report`` reads: the
study file logged on the session's first parent run, one row per trial (tags, status, the params the
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
PLAN_ARTIFACT = "plan.json"  # a grid invocation's parent: the identities of its plan
DISTRIBUTION_ARTIFACT = "class_distribution.png"
PREDICTIONS_ARTIFACT = "predictions.json"
# trial-config params the report states (its title, the fold correction)
# what each trial's selected model costs (fermodel.cost), measured on its device
COST_METRICS = ("params", "gflops", "latency_ms", "throughput", "peak_memory_mb")
STATED_PARAMS = (
    "loss",
    "lam",
    "lam1",
    "protocol",
    "folds",
    "drop_leaked",
    "clean",
    "drop_mislabeled",
    "labels",
    "backbone",
    "attention",
    "split_seed",
)


@dataclass
class StudyData:
    study: str
    session: str
    dataset: str
    meta: dict  # the study file as logged on the parent run ({} if absent)
    trials: pd.DataFrame  # one row per trial of the session
    preset: str = ""
    data_path: str = ""
    gpus_per_trial: float = 0.0
    predictions: dict[str, dict] = field(default_factory=dict)  # run id -> predictions.json
    curves: dict[str, list[float]] = field(default_factory=dict)  # run id -> val accuracy/epoch
    distribution_png: bytes | None = None
    ignored: int = 0  # finished runs in the experiment that are not trials of this plan

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


def trial_frame(runs) -> pd.DataFrame:
    """One row per trial run: tags, status, params of interest, final metrics."""
    rows = []
    for run in runs:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        rows.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name or "",
                "status": run.info.status,
                "cell": tags.get("cell", ""),
                "seed": int(tags.get("seed", 0)),
                "fold": int(tags.get("fold", 0)),
                "repetition": int(tags.get("repetition", 0)),
                "trial": tags.get("ray_trial_id", ""),
                "identity": tags.get("trial_identity", ""),
                "sampled": tags.get("sampled", ""),
                "stopped_early": tags.get("stopped_early") == "true",
                "error": tags.get("error", ""),
                "planned_epochs": int(params.get("epochs", 0) or 0),
                "epochs_run": int(metrics.get("epoch", 0)),
                **{k: params.get(k, "") for k in STATED_PARAMS},
                **{k: v for k, v in metrics.items() if k.startswith(("test_", "best_"))},
                **{
                    k: metrics.get(k, math.nan)
                    for k in (
                        "train_seconds",
                        "trial_seconds",
                        "mean_images_per_second",
                        "train_images",
                        "test_images",
                        *COST_METRICS,
                    )
                },
            }
        )
    return pd.DataFrame(rows)


def session_frame(tracker, session: str) -> pd.DataFrame:
    """One row per trial of the session (a trial Tune retried or resumed counted once)."""
    frame = trial_frame(tracker.session_runs(session))
    if frame.empty:
        return frame
    return frame.drop_duplicates("trial", keep="last").reset_index(drop=True)


def identity_frame(tracker, identities: list[str]) -> tuple[pd.DataFrame, int]:
    """One row per identity of a plan, whichever invocation ran it: its newest FINISHED run,
    else its newest run; and how many finished runs of the experiment are not of this plan."""
    from orchestrate.plan.ledger import IDENTITY_TAG, identity_runs

    by_identity = identity_runs(tracker)
    chosen = []
    for identity in identities:
        runs = by_identity.get(identity, [])
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished or runs:
            chosen.append((finished or runs)[0])
    planned = set(identities)
    from orchestrate.store.tracking import PARENT_TAG

    others = tracker.client.search_runs(
        [tracker.experiment_id],
        max_results=50_000,
        filter_string=f"tags.{PARENT_TAG} = 'false' and attributes.status = 'FINISHED'",
    )
    ignored = sum(r.data.tags.get(IDENTITY_TAG) not in planned for r in others)
    return trial_frame(chosen), ignored


def _artifact(tracker, run_id: str, name: str, folder: str) -> Path | None:
    try:
        return Path(tracker.client.download_artifacts(run_id, name, folder))
    except Exception:  # absent artifact: MLflow raises store-specific errors
        return None


def collect(tracker, session: str) -> StudyData:
    """Everything the report of ``session`` reads, from the tracker's MLflow store. A grid
    invocation's parent names its plan's identities (``plan.json``): its report holds every
    one of them, whichever invocation finished it; otherwise the session's own trials."""
    parents = sorted(tracker.session_runs(session, parents=True), key=lambda r: r.info.start_time)
    if not parents:
        raise ValueError(f"no parent run of study session {session!r} in this store")
    first = parents[0]
    data = StudyData(
        study=first.data.tags.get("study", ""),
        session=session,
        dataset=first.data.params.get("dataset", ""),
        meta={},
        trials=pd.DataFrame(),
        preset=first.data.params.get("preset", ""),
        data_path=first.data.params.get("data_path", "").replace("None", ""),
        gpus_per_trial=float(first.data.params.get("gpus_per_trial", 0) or 0),
    )
    with tempfile.TemporaryDirectory(prefix="fer-report-") as folder:
        plan = _artifact(tracker, first.info.run_id, PLAN_ARTIFACT, folder)
        if plan is not None:
            identities = json.loads(plan.read_text())["identities"]
            data.trials, data.ignored = identity_frame(tracker, identities)
        else:
            data.trials = session_frame(tracker, session)
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
