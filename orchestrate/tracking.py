"""MLflow tracking of a study: one experiment per study, one parent run per invocation, one child
run per trial, all written from the driver process.

Trials never talk to MLflow: a Tune callback in the driver turns their results into batched
``log_batch`` calls. One writer means a SQLite store never sees "database is locked", and a
cluster needs no MLflow credentials on its workers. The default store needs no server:
``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute cwd>/mlflow.db`` with artifacts in
``<cwd>/mlartifacts``; ``--tracking-uri http://host:5000`` logs through an MLflow server.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

PARENT_TAG = "study_parent"  # "true" on a study's parent runs
SESSION_TAG = "study_session"  # the Tune experiment folder: shared by an invocation and its resumes
TRIAL_TAG = "ray_trial_id"
MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
# session -> future of (StudyTracker, parent run id), set by the runner of this process
OPENING: dict = {}


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used."""


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def mask(text: str) -> str:
    """Hide the password of a URI such as ``http://user:secret@host`` (and S3-style keys)."""
    return re.sub(r"(//[^/:@\s]+):[^@/\s]+@", r"\1:***@", str(text))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any trial, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow server {mask(uri)} answered {response.status}")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow server {mask(uri)} is unreachable ({reason})") from None


class StudyTracker:
    """The MLflow side of one invocation: experiment, parent run, child-run lookup."""

    def __init__(self, uri: str, study: str):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(study)
        if experiment is None:
            location = None
            if uri.startswith("sqlite:"):
                location = (Path.cwd() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(
                study,
                artifact_location=location,
                # MLflow 3's UI opens an experiment of this kind on its runs, not on GenAI traces
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        else:
            self.experiment_id = experiment.experiment_id
        self.parent_id: str | None = None

    def start_parent(self, session: str, tags: dict, params: dict) -> str:
        run = self.client.create_run(
            self.experiment_id,
            tags={PARENT_TAG: "true", SESSION_TAG: session, MLFLOW_RUN_NAME: session,
                  **{k: mask(v) for k, v in tags.items()}},
        )  # fmt: skip
        self.parent_id = run.info.run_id
        self.client.log_batch(
            self.parent_id, params=[Param(k, mask(str(v))) for k, v in params.items()]
        )
        return self.parent_id

    def end_parent(self, status: str) -> None:
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)

    def session_runs(self, session: str, parents: bool = False):
        kind = "true" if parents else "false"
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{SESSION_TAG} = '{session}' and tags.{PARENT_TAG} = '{kind}'",
            max_results=10_000,
        )

    def close_stale(self, session: str) -> int:
        """Runs of an interrupted earlier invocation left RUNNING: parents become KILLED now;
        children are picked up again by their trial (or closed at the end)."""
        stale = [r for r in self.session_runs(session, parents=True) if r.info.status == "RUNNING"]
        for run in stale:
            if run.info.run_id != self.parent_id:
                self.client.set_terminated(run.info.run_id, "KILLED")
        return len(stale)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int) -> None:
    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # drop NaN
    ]
    for start in range(0, len(batch), MAX_BATCH):
        client.log_batch(run_id, metrics=batch[start : start + MAX_BATCH])


EPOCH_KEYS = re.compile(r"^(epoch|train_\w+|val_\w+|lr|images_per_second|epoch_seconds)$")
FINAL_KEYS = re.compile(r"^(test_\w+|best_epoch|best_val_accuracy|trial_seconds|train_seconds|"
                        r"mean_images_per_second)$")  # fmt: skip


class MLflowTrials(Callback):
    """Child runs of the trials, written from the driver as Tune reports them.

    Tune pickles its callbacks with the experiment and restores them on ``--resume``, so this
    one keeps no connection or run id across that: on its first event it takes the store and
    parent run this invocation is opening (``OPENING``), or finds the session's running parent.
    """

    def __init__(self, uri: str, study: str, session: str, describe, log_checkpoints=True):
        self.uri, self.study, self.session = uri, study, session
        self.describe, self.log_checkpoints = describe, log_checkpoints
        self.client = self.tracker = None
        self.runs: dict[str, str] = {}  # Ray trial id -> MLflow run id

    def __getstate__(self):
        return {**self.__dict__, "client": None, "tracker": None, "runs": {}}

    def _connect(self) -> None:
        if self.client is not None:
            return
        opening = OPENING.get(self.session)
        if opening is not None:  # this process is opening the store: wait for it
            self.tracker = opening.result()[0]
        else:
            self.tracker = StudyTracker(self.uri, self.study)
            running = [
                r for r in self.tracker.session_runs(self.session, parents=True)
                if r.info.status == "RUNNING"
            ]  # fmt: skip
            if not running:
                raise TrackingError(f"no running parent run for study session {self.session}")
            self.tracker.parent_id = max(running, key=lambda r: r.info.start_time).info.run_id
        self.client = self.tracker.client

    def _run_for(self, trial) -> str:
        self._connect()
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        existing = self.client.search_runs(
            [self.tracker.experiment_id],
            filter_string=f"tags.{TRIAL_TAG} = '{trial.trial_id}' "
            f"and tags.{SESSION_TAG} = '{self.session}'",
            max_results=1,
        )
        if existing:  # a resumed trial continues its own run
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            info = self.describe(trial.config)
            tags = {
                MLFLOW_PARENT_RUN_ID: self.tracker.parent_id,
                MLFLOW_RUN_NAME: info["name"],
                SESSION_TAG: self.session,
                PARENT_TAG: "false",
                TRIAL_TAG: trial.trial_id,
                **{k: str(v) for k, v in info["tags"].items()},
            }
            run_id = self.client.create_run(self.tracker.experiment_id, tags=tags).info.run_id
            params = [Param(k, mask(str(v))) for k, v in info["params"].items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start : start + 100])
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        if result.get("completed") or "error" in result:
            final = {k: v for k, v in result.items() if FINAL_KEYS.match(k)}
            log_metrics(self.client, run_id, final, step=int(result.get("epoch", 0)))
            if "error" in result:
                self.client.set_tag(run_id, "error", str(result["error"])[:5000])
            if "node_id" in result:  # which Ray node ran the trial's last attempt
                self.client.set_tag(run_id, "ray_node_id", str(result["node_id"]))
        else:
            epoch = {k: v for k, v in result.items() if EPOCH_KEYS.match(k)}
            log_metrics(self.client, run_id, epoch, step=int(result.get("epoch", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        last = trial.last_result or {}
        if trial.checkpoint is not None and last.get("completed"):
            self._log_artifacts(run_id, trial.checkpoint)
        if "error" in last:
            self.client.set_terminated(run_id, "FAILED")
        else:
            if not last.get("completed"):
                self.client.set_tag(run_id, "stopped_early", "true")
            self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self.client.set_tag(run_id, "error", _error_text(trial))
        self.client.set_terminated(run_id, "FAILED")

    def _log_artifacts(self, run_id: str, checkpoint) -> None:
        with tempfile.TemporaryDirectory(prefix="fer-artifacts-") as folder:
            checkpoint.to_directory(folder)
            if not self.log_checkpoints:
                Path(folder, "best_model.pt").unlink(missing_ok=True)
            Path(folder, "state.pt").unlink(missing_ok=True)
            self.client.log_artifacts(run_id, folder)


def _error_text(trial) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[-1][:5000]
    return "trial failed (no error message recorded)"
