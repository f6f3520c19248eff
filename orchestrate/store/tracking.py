"""MLflow tracking of a study: one experiment per study, one parent run per invocation, one child
run per trial, all written from the driver process.

Trials never talk to MLflow: a Tune callback in the driver turns their results into batched
``log_batch`` calls. One writer means a SQLite store never sees "database is locked", and a
cluster needs no MLflow credentials on its workers. The callback only queues its writes: one
``Writer`` thread performs them in order and, while a server is away, retries with backoff, so
an outage delays no trial and loses nothing; how long it lasted and how many writes waited is
reported at the end. The default store needs no server:
``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute cwd>/mlflow.db``; a SQLite store keeps
its artifacts in ``mlartifacts/`` beside the database; ``--tracking-uri http://host:5000`` logs
through an MLflow server.

Runs are what MLflow users expect: every run names its source and git commit and has its
dataset as an input; each finished trial's selected model is an MLflow PyTorch model (with a
signature, an input example and its class names); the study's best model on validation is a
version of the registered model named after the study, alias ``best``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    Metric,
    Param,
    RunTag,
    SourceType,
)
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_RUN_NAME,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

PARENT_TAG = "study_parent"  # "true" on a study's parent runs
SESSION_TAG = "study_session"  # the Tune experiment folder: shared by an invocation and its resumes
TRIAL_TAG = "ray_trial_id"
MEMBER_TAG = "pack_index"  # a grid trial's place in its Tune trial's pack (0 when alone)
MAX_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
MODEL_NAME = "model"  # a trial's logged model: runs:/<run id>/model
BEST_ALIAS = "best"  # models:/<study>@best, the study's best model on validation
KIND_TAG = "mlflow.experimentKind"
# MLflow 3's UI opens an experiment of this kind on its runs, not on GenAI traces
MODEL_DEVELOPMENT = "custom_model_development"
# session -> this driver's running ``orchestrate.run.runner.Invocation`` (its store and writer):
# Tune pickles its callbacks with the experiment, so they look the invocation up here by session
LIVE: dict = {}
# what a server that is away (or overloaded) looks like from MLflow's client
TRANSIENT = re.compile(
    r"Connection|connect|Max retries|timed out|Timeout|Temporary failure|Name or service|"
    r"Remote end closed|status code 5\d\d|\b50[234]\b|\b429\b|database is locked|"
    r"RESOURCE_EXHAUSTED|TEMPORARILY_UNAVAILABLE"
)


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used."""


class Writer:
    """Every MLflow write of a study, performed in order by one thread.

    ``submit`` queues a write and returns at once (it waits only when ``capacity`` writes are
    already queued). A write that fails because the server cannot be reached is retried with
    exponential backoff (0.5 s doubling to 10 s) for up to ``budget`` seconds of continuous
    outage; then the writer gives up, drops what is queued, and ``flush`` raises a
    ``TrackingError`` saying so. Other errors are retried twice, then counted as lost writes.
    """

    def __init__(self, budget: float = 1800.0, capacity: int = 10_000):
        self.budget = budget
        self.queue: queue.Queue = queue.Queue(capacity)
        self.outages: list[float] = []  # seconds of each outage the writer waited through
        self.retried = 0  # writes that needed at least one retry
        self.lost: list[str] = []  # writes given up on, with the reason
        self.error: TrackingError | None = None
        self._thread = threading.Thread(target=self._drain, name="mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, what: str, write: Callable[[], object]) -> None:
        self.queue.put((what, write))

    def _drain(self) -> None:
        while True:
            what, write = self.queue.get()
            try:
                if self.error is None:
                    self.call(write, what)
            except Exception as err:  # recorded; the study reports it at the end
                self.lost.append(f"{what}: {_short(err)}")
            finally:
                self.queue.task_done()

    def call(self, write: Callable[[], object], what: str = "MLflow call"):
        """Run one MLflow call now, in this thread, with the retry policy above."""
        delay, attempts, down_since = 0.5, 0, None
        while True:
            try:
                result = write()
                if down_since is not None:
                    self.outages.append(time.monotonic() - down_since)
                if attempts:
                    self.retried += 1
                return result
            except Exception as err:
                attempts += 1
                if not TRANSIENT.search(f"{type(err).__name__} {err}"):
                    if attempts > 2:
                        raise
                else:
                    down_since = down_since or time.monotonic()
                    if time.monotonic() - down_since > self.budget:
                        self.error = TrackingError(
                            f"the MLflow server was unreachable for more than {self.budget:.0f} s "
                            f"(--mlflow-retry-budget); gave up at {what}: {_short(err)}"
                        )
                        raise self.error from None
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def flush(self) -> None:
        """Wait until every queued write is done; raise if the writer gave up."""
        self.queue.join()
        if self.error is not None:
            raise self.error

    def summary(self) -> str | None:
        if not self.outages and not self.lost:
            return None
        parts = []
        if self.outages:
            parts.append(
                f"MLflow was unreachable {len(self.outages)} time(s), "
                f"{sum(self.outages):.0f} s in all (longest {max(self.outages):.0f} s); "
                f"{self.retried} write(s) waited and were retried, none lost"
            )
        if self.lost:
            parts.append(
                f"{len(self.lost)} write(s) failed and were dropped, first: {self.lost[0]}"
            )
        return "; ".join(parts)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


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
    """The MLflow side of one invocation: experiment, parent run, child-run lookup.

    ``inputs`` gives a trial config's dataset input (``DatasetInputs``); the report, which
    only reads, goes without."""

    def __init__(self, uri: str, study: str, inputs: DatasetInputs | None = None):
        self.uri, self.study, self.inputs = uri, study, inputs
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(study)
        if experiment is None:
            location = None
            if uri.startswith("sqlite:///"):  # a store is its database and, beside it, artifacts
                database = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
                location = (database.parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(
                study, artifact_location=location, tags={KIND_TAG: MODEL_DEVELOPMENT}
            )
        else:
            self.experiment_id = experiment.experiment_id
            if KIND_TAG not in experiment.tags:  # made by an earlier version of this project
                self.client.set_experiment_tag(self.experiment_id, KIND_TAG, MODEL_DEVELOPMENT)
        self.parent_id: str | None = None

    def start_parent(self, session: str, tags: dict, params: dict, config) -> str:
        """The session's parent run; ``config`` (a trial's) names the dataset it reads."""
        run = self.client.create_run(
            self.experiment_id,
            tags={
                PARENT_TAG: "true",
                SESSION_TAG: session,
                MLFLOW_RUN_NAME: session,
                **source_tags(),
                **{k: mask(v) for k, v in tags.items()},
            },
        )
        self.parent_id = run.info.run_id
        self.client.log_batch(
            self.parent_id, params=[Param(k, mask(str(v))) for k, v in params.items()]
        )
        self.log_input(self.parent_id, config)
        return self.parent_id

    def log_input(self, run_id: str, config) -> None:
        if self.inputs is not None:
            self.client.log_inputs(run_id, datasets=[self.inputs(config)])

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

    def reopen_parent(self, session: str) -> str | None:
        """On ``--resume``: the session's parent run, RUNNING again, so that every trial keeps
        exactly one child run under one parent; None when this store has none."""
        parents = self.session_runs(session, parents=True)
        if not parents:
            return None
        parent = max(parents, key=lambda r: r.info.start_time)
        self.parent_id = parent.info.run_id
        self.client.update_run(self.parent_id, status="RUNNING")
        resumes = int(parent.data.tags.get("resumes", "0")) + 1
        self.client.set_tag(self.parent_id, "resumes", str(resumes))
        return self.parent_id


@functools.cache
def source_tags() -> dict[str, str]:
    """Where the runs' code comes from: the study command's file and, when this code is a git
    checkout, its commit (the driver's checkout: the workers run what the driver shipped)."""
    root = Path(__file__).resolve().parents[2]  # orchestrate/store/tracking.py: the checkout
    tags = {
        MLFLOW_SOURCE_NAME: str(root / "orchestrate" / "ablation.py"),
        MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
    }
    top = _git(root, "rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == root and (commit := _git(root, "rev-parse", "HEAD")):
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    return done.stdout.strip() if done.returncode == 0 else None


class DatasetInputs:
    """The MLflow dataset input of a trial config: the train, validation and test images it
    reads, split on the driver once per distinct split (in the writer thread, off Tune's loop).
    ``datasets`` maps ``fermodel.engine.data_key`` to the dataset the runner loaded."""

    def __init__(self, datasets: dict):
        self.datasets = datasets
        self.made: dict[str, DatasetInput] = {}

    def __call__(self, config) -> DatasetInput:
        from fermodel.config import SPLIT_KEYS
        from fermodel.engine import data_key

        key = json.dumps([data_key(config), *(getattr(config, k) for k in SPLIT_KEYS)])
        if key not in self.made:
            self.made[key] = dataset_input(self.datasets[data_key(config)], config)
        return self.made[key]


def dataset_input(data, config) -> DatasetInput:
    """Name, content digest (the splits' images and labels), source (the data path, or the
    synthetic set's settings), schema and split sizes of the images a trial reads."""
    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    from fermodel.engine import trial_splits

    c = config
    splits = trial_splits(c, data)
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    digest = hashlib.sha256()
    for name, part in parts.items():
        for value in (name.encode(), part.images.numpy().tobytes(), part.labels.numpy().tobytes()):
            digest.update(value)
    source_type, source = "local", c.data_path
    if c.dataset == "synthetic":
        source_type = "code"
        source = (
            f"synthetic:subjects={c.synthetic_subjects},images_per_class="
            f"{c.synthetic_images_per_class},difficulty={c.synthetic_difficulty},"
            f"seed={c.split_seed}"
        )
    schema = TensorDatasetSchema(
        features=Schema([TensorSpec(np.dtype(np.uint8), (-1, 1, 48, 48), "image")]),
        targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]),
    )
    profile = {
        **{name: len(part) for name, part in parts.items()},
        "classes": list(data.classes),
        "protocol": c.protocol,
        "fold": c.fold,
        "balance": c.balance or "none",
    }
    dataset = Dataset(
        name=data.name,
        digest=digest.hexdigest()[:16],
        source_type=source_type,
        source=json.dumps({"uri": source}),
        schema=json.dumps(schema.to_dict()),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


@contextmanager
def _on_run(uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent model API, aimed at ``run_id`` from this thread. Its active run is this
    thread's alone, but its store is the process's (MLflow 3 keeps the tracking URI global and
    mirrors it in MLFLOW_TRACKING_URI): set for the call and put back, so that nothing else in
    the process is pointed at it."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.start_run(run_id=run_id)
        try:
            yield
        finally:
            mlflow.end_run()  # FINISHED, as the trial is, even if its model could not be logged
    finally:
        mlflow.set_tracking_uri(previous)


def log_model(uri: str, run_id: str, config, classes: list[str], weights: dict, step: int):
    """A trial's selected model as an MLflow PyTorch model of its run: the engine's wrapper
    (float32 grey images [N, 1, 48, 48] in [0, 1] -> logits [N, K]) on the CPU, in eval mode,
    with a signature, an input example and its class names. MLflow 3 saves it with
    ``torch.export`` (its default): a graph, no pickle, so loading needs torch alone, runs no
    code, and gives a module already in eval mode. ``step`` is the selected epoch: its
    validation metrics are the model's. Returns MLflow's ModelInfo."""
    from importlib.metadata import version

    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from fermodel.predict import selected_model

    net = selected_model(config, len(classes), weights)
    # two images: the exported batch size stays free only where the example's is above 1
    example = np.random.default_rng(0).random((2, 1, 48, 48), dtype=np.float32)
    with torch.inference_mode():
        signature = infer_signature(example, net(torch.from_numpy(example)).numpy())
    with _on_run(uri, run_id):
        return mlflow.pytorch.log_model(
            net,
            name=MODEL_NAME,
            signature=signature,
            input_example=example,
            metadata={
                "classes": list(classes),
                "input": "float32 [N, 1, 48, 48] grey, 0-1",
                "output": "logits [N, K] in the order of classes",
            },
            # what loading needs; MLflow's own inference would start a Python per trial for it
            pip_requirements=[f"torch=={version('torch').split('+')[0]}"],
            step=step,
            # MLflow would load the exported graph back and run the example through it, which
            # costs the driver about as much again as the export, per trial; tests/test_predict.py
            # loads and runs logged models instead
            validate_serving_input=False,
        )


def register_best(
    tracker: StudyTracker,
    session: str,
    run_ids: list[str] | None = None,
    alias: str = BEST_ALIAS,
    chosen_by: str = "",
) -> str | None:
    """Register the best trial on validation accuracy (never test; ties: the trial that started
    first) among ``run_ids`` (the report's trials: a grid plan's identities, whichever invocation
    ran them), or the session's, as a new version of the registered model named after the
    study, and point its alias (``best``) at it. Returns ``models:/<study>@<alias>``, or None
    when that trial has no logged model. ``chosen_by`` says, on the version, how a caller that
    passes one run chose it (a tuning study's constrained best)."""
    client, name = tracker.client, tracker.study
    runs = (
        [client.get_run(r) for r in run_ids]
        if run_ids is not None
        else tracker.session_runs(session)
    )
    done = [
        r for r in runs if r.info.status == "FINISHED" and "best_val_accuracy" in r.data.metrics
    ]
    if not done:
        return None
    best = min(done, key=lambda r: (-r.data.metrics["best_val_accuracy"], r.info.start_time))
    models = client.search_logged_models(
        [tracker.experiment_id], filter_string=f"source_run_id = '{best.info.run_id}'"
    )
    if not models:
        return None
    model = max(models, key=lambda m: m.creation_timestamp)  # a retried write logs it again
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        about = f"Study {name}'s best model on validation accuracy; alias {BEST_ALIAS}: the newest"
        client.create_registered_model(name, description=about)
    tags = {
        "session": session,
        "trial": best.info.run_name,
        "best_val_accuracy": best.data.metrics["best_val_accuracy"],
        "chosen_by": chosen_by or "best validation accuracy",
    }
    # the model's own location: MLflow's SQL registry looks a models:/<id> source up in the
    # process's global store, not in this client's
    version = client.create_model_version(
        name,
        source=model.artifact_location,
        run_id=best.info.run_id,
        tags=tags,
        model_id=model.model_id,
    )
    client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"


FEASIBLE_ALIAS = "best_feasible"  # a tuning study with constraints: its best feasible trial


def tag_tuning(tracker: StudyTracker, tuning) -> None:
    """Each ranked trial's place on its run: ``pareto_front`` (several objectives) and, with
    constraints, ``feasible`` on every trial whose constrained values are known."""
    for row in tuning.trials.itertuples():
        tags = {}
        if len(tuning.goals) > 1 and row.ranked:
            tags["pareto_front"] = str(bool(row.front)).lower()
        if tuning.constraints and row.status == "FINISHED":
            tags["feasible"] = "false" if row.violates else "true"
        if tags:
            tracker.client.log_batch(row.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def copy_epochs(client: MlflowClient, source: str, target: str, last_epoch: int) -> None:
    """The per-epoch metrics of ``source`` up to ``last_epoch``, logged again on ``target``."""
    keys = [k for k in client.get_run(source).data.metrics if EPOCH_KEYS.match(k)]
    batch = [m for k in keys for m in client.get_metric_history(source, k) if m.step <= last_epoch]
    for start in range(0, len(batch), MAX_BATCH):
        client.log_batch(target, metrics=batch[start : start + MAX_BATCH])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int) -> None:
    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # drop NaN
    ]
    for start in range(0, len(batch), MAX_BATCH):
        client.log_batch(run_id, metrics=batch[start : start + MAX_BATCH])


EPOCH_KEYS = re.compile(
    r"^(epoch|train_\w+|val_\w+|best_val_accuracy|lr|images_per_second|"
    r"epoch_seconds)$"
)
FINAL_KEYS = re.compile(
    r"^(test_\w+|best_epoch|best_val_accuracy|trial_seconds|train_seconds|"
    r"mean_images_per_second|checkpoints|checkpoint_seconds|train_images|"
    r"val_images|params|gflops|latency_ms|throughput|latency_threads|"
    r"peak_memory_mb)$"
)


def failure_reason(text: str) -> str:
    """``divergence``, ``out of memory`` or ``exception``, from a trial's error message."""
    if "TrialDiverged" in text or "non-finite loss" in text:
        return "divergence"
    if re.search(r"OutOfMemoryError|out of memory|OOM|MemoryError", text):
        return "out of memory"
    return "exception"
