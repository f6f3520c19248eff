"""Plan a study's trials and run them on Ray Tune, tracked in MLflow.

Grid studies (the paper's tables) run every cell x seed x fold exactly once with Tune's grid
variant generator, which ``Tuner.restore`` resumes exactly. Tuning studies use Optuna's TPE
through Tune's OptunaSearch with ASHA early stopping; a trial ASHA stops early is told to Optuna
as PRUNED (its per-epoch values are reported as intermediate values), never as a COMPLETE trial
with a low-fidelity value, which would bias TPE toward configurations that merely start fast.

Everything that can be wrong with the input (study file, dataset path, tracking server) is
checked before a single MLflow run is created. Datasets are read once here, on the driver, and
reach the trials through Ray's object store (``tune.with_parameters``). A finished study writes
its report to ``reports/<session>/`` and to its parent run, registers its best model on
validation as ``models:/<study>@best``, and ends with the URL of its runs in MLflow's UI.
"""

from __future__ import annotations

import math
import signal
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from orchestrate.storage import Storage
from search_spaces import Study


@dataclass
class RunOptions:
    preset: str | None = None
    epochs: int | None = None
    num_samples: int | None = None
    gpus_per_trial: float | None = 0.0  # None: 1 when the cluster has GPUs, else 0
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None
    address: str | None = None
    storage: str = "ray_results"  # a folder, or a URI such as s3://bucket/prefix
    node_timeout: float = 600.0  # how long to wait for an autoscaler to start a big enough node
    mlflow_retry_budget: float = 1800.0  # longest MLflow outage the writer waits through
    pretrained: str | None = None  # replaces the study's: a file, a folder, or "" (none)
    tracking_uri: str = ""
    max_failures: int = 2
    resume: bool = False
    dry_run: bool = False
    verbose: bool = False
    log_checkpoints: bool = True  # each trial's selected model, as an MLflow model
    reports: str = "reports"  # the study report goes to <reports>/<session>/


@dataclass
class Plan:
    study: Study
    preset: str | None
    trials: list  # TrialSpec for grids
    base: dict  # trial-config keys every trial shares (tuning studies sample on top)
    tune: object | None  # TuneSettings for tuning studies

    @property
    def size(self) -> int:
        return len(self.trials) if self.study.kind == "grid" else self.tune.num_samples

    def configs(self) -> list:
        """The trials' configs (grids), or the base config that tuning samples on."""
        from fermodel.config import TrialConfig

        return [s.config for s in self.trials] or [TrialConfig.from_dict(self.base)]


def make_plan(study: Study, options: RunOptions) -> Plan:
    changes = {"epochs": options.epochs} if options.epochs else {}
    if options.gpus_per_trial == 0:
        changes["device"] = "cpu"
    if options.pretrained is not None:
        changes["pretrained"] = options.pretrained
    base = study.base_config(options.preset, **changes)
    if study.kind == "grid":
        return Plan(study, options.preset, study.trials(options.preset, **changes), base, None)
    settings = study.tune_settings(options.preset)
    if options.num_samples:
        settings = replace(settings, num_samples=options.num_samples)
    return Plan(study, options.preset, [], base, settings)


def describe_plan(plan: Plan, options: RunOptions) -> str:
    study = plan.study
    lines = [
        f"study {study.name} ({study.kind}): {study.description}",
        f"dataset {study.dataset} {study.data_path or ''}, protocol {study.resolved_protocol}, "
        f"preset {plan.preset}, seeds {study.seeds_for(plan.preset)}",
        f"resources per trial: {options.cpus_per_trial:g} CPU, {_gpus_text(options)}; "
        f"max concurrent: {options.max_concurrent or 'as resources allow'}",
        "initialisation: " + {IMAGENET: "ImageNet (give --pretrained FILE|FOLDER, or none)",
                              "": "random (no pretrained weights)"}.get(
            plan.base.get("pretrained", ""), f"from {plan.base.get('pretrained')}"),
    ]  # fmt: skip
    if study.kind == "grid":
        lines.append(f"{len(plan.trials)} trials:")
        for spec in plan.trials:
            c = spec.config
            lines.append(f"  {spec.key:34s} {c.backbone}/{c.attention}/{c.loss} "
                         f"epochs {c.epochs}, batch {c.batch_size}, lr {c.lr}")  # fmt: skip
    else:
        from orchestrate.search import rungs

        t = plan.tune
        epochs = int(plan.base.get("epochs", 200))
        stops = rungs(epochs, t.grace_period, t.reduction_factor)
        lines.append(
            f"{t.num_samples} trials sampled by Optuna TPE, "
            f"{options.max_concurrent or default_concurrency(t.num_samples)} at a time; ASHA on "
            f"{t.metric} ({t.mode}), grace {t.grace_period}, reduction {t.reduction_factor}: "
            + (f"may stop trials after epochs {', '.join(map(str, stops))} of {epochs}"
               if stops else f"no rung before the last of {epochs} epochs, no early stopping")
        )  # fmt: skip
        for p in study.space:
            when = f" when {p.when}" if p.when else ""
            values = list(p.choices) if p.type == "categorical" else f"[{p.low}, {p.high}]"
            lines.append(f"  {p.name}: {p.type} {values}{when}")
    return "\n".join(lines)


IMAGENET = "imagenet"  # a preset's "ImageNet weights, the user says where": --pretrained


def check_pretrained(plan: Plan) -> None:
    """Every trial's pretrained source is given and readable, before anything starts."""
    from fermodel.config import ConfigError
    from fermodel.pretrained import check_source, download_hint

    checked = set()
    for c in plan.configs():
        source, backbone = c.pretrained, c.backbone
        if source == IMAGENET:
            raise ConfigError(
                f"pretrained: preset {plan.preset} starts from ImageNet weights, as the paper "
                f"does: give --pretrained FILE (torchvision's {backbone} file) or FOLDER "
                f"(torchvision's checkpoint folder), or --pretrained none to train from "
                f"scratch; {download_hint(backbone)}"
            )
        # a file is read once; a folder once per backbone (each takes its own file from it)
        key = (source, backbone if Path(source).expanduser().is_dir() else None)
        if source and key not in checked:
            checked.add(key)
            check_source(source, backbone)  # raises PretrainedError naming the file


def _gpus_text(options: RunOptions) -> str:
    if options.gpus_per_trial is None:
        return "1 GPU if the cluster has GPUs, else none"
    return f"{options.gpus_per_trial:g} GPU"


class Describe:
    """Tags and params of a trial's MLflow run, from its Tune config (picklable)."""

    def __init__(self, study: str, base: dict):
        self.study, self.base = study, base

    def __call__(self, params: dict) -> dict:
        from orchestrate.trainable import trial_config

        config, place = trial_config(params, self.base)
        name = f"{place['cell']}-seed{place['seed']}-fold{place['fold']}"
        tags = {"study": self.study, **place}
        if "spec" not in params:
            tags["sampled"] = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
        return {"name": name, "tags": tags, "params": config.to_dict(), "config": config}


def load_datasets(plan: Plan) -> dict:
    """Every distinct dataset the plan's trials read, loaded once (errors surface here)."""
    from fermodel.engine import data_key, load_trial_data

    datasets = {}
    for config in plan.configs():
        key = data_key(config)
        if key not in datasets:
            datasets[key] = load_trial_data(
                config, cache_dir=Path.home() / ".cache" / "fer-ablation"
            )
    return datasets


def run_study(study: Study, options: RunOptions, out=None) -> dict:
    """Run a study to the end; returns a summary (session, parent run id, table, counts).
    An interrupted study (Ctrl-C) raises KeyboardInterrupt after marking its runs KILLED."""
    out = out or sys.stdout
    from orchestrate import interrupt, sessions
    from orchestrate.cluster import (
        alive_nodes,
        check_resources,
        check_storage_shared,
        cluster_has_gpus,
        quiet_ray,
        ray_is_up,
        start_ray,
    )
    from orchestrate.render import format_table
    from orchestrate.tracking import OPENING, WRITERS, Writer, check_reachable, register_best

    plan = make_plan(study, options)
    if options.dry_run:
        print(describe_plan(plan, options), file=out)
        return {"planned": plan.size}

    # everything that can be wrong is found before an MLflow run or a trial exists
    check_pretrained(plan)
    storage = Storage.parse(options.storage)
    storage.check()
    session = sessions.resumable(plan, storage) if options.resume else sessions.new_session(plan)
    check_reachable(options.tracking_uri)
    datasets = load_datasets(plan)
    quiet_ray(options.verbose)
    started_ray = start_ray(options.address, options.verbose)
    writer = Writer(budget=options.mlflow_retry_budget)
    opening = None
    status = "FAILED"
    try:
        if options.gpus_per_trial is None:
            options = replace(options, gpus_per_trial=1.0 if cluster_has_gpus() else 0.0)
            plan = make_plan(study, options)
        check_resources(options.cpus_per_trial, options.gpus_per_trial, options.node_timeout, out)
        if not started_ray or len(alive_nodes()) > 1:
            check_storage_shared(storage)
        interrupt.clear(session)  # a flag left by an interrupted earlier invocation
        if not options.resume:
            sessions.write_plan(storage, session, plan)
        # MLflow's import and a new store's migrations take seconds: open the store and the
        # parent run in a thread while Tune starts its workers; the trial callback waits for it
        distribution = _class_distribution(plan, datasets)
        opening = ThreadPoolExecutor(1, thread_name_prefix="mlflow-open").submit(
            _open_tracking, options, study, plan, session, datasets, distribution, writer
        )
        OPENING[session], WRITERS[session] = opening, writer
        results = _tuner(plan, options, storage, session, datasets, out).fit()
        tracker = opening.result()[0]
        writer.flush()
        ended = results.num_terminated + results.num_errors
        if ended < plan.size:  # Tune stops gracefully on the first Ctrl-C and returns
            raise KeyboardInterrupt(f"{ended} of {plan.size} trials ended")
        writer.call(lambda: _close_leftovers(tracker, session, "FAILED"))
        folder = Path(options.reports) / session
        report, paths = writer.call(lambda: _publish_report(tracker, session, folder))
        best = None
        if options.log_checkpoints:
            best = writer.call(lambda: register_best(tracker, session))
        sessions.mark_finished(storage, session, {"parent_run_id": tracker.parent_id})
        print("\n" + format_table(report), file=out)
        if note := writer.summary():
            print(f"\ntracking: {note}", file=out)
        print(_next_steps(options, tracker.experiment_id, paths, best), file=out)
        status = "FINISHED"
        return {"session": session, "parent_run_id": tracker.parent_id, "report": report,
                "table": report.table, "frame": report.trials, "model": best}  # fmt: skip
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _end(opening, writer, session, status, out)
        if ray_is_up():
            interrupt.clear(session)
        if started_ray:
            import ray

            ray.shutdown()


def _tuner(plan: Plan, options: RunOptions, storage, session: str, datasets: dict, out):
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, Tuner

    from orchestrate.interrupt import GracefulStop
    from orchestrate.progress import Progress
    from orchestrate.tracking import MLflowTrials
    from orchestrate.trainable import run_trial

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, datasets=datasets, base=plan.base,
                             cpus=options.cpus_per_trial, session_uri=storage.join(session)),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
    )  # fmt: skip
    path = storage.join(session)
    if options.resume:
        print(f"resuming {path}", file=out)
        return Tuner.restore(path, trainable, resume_errored=True)
    callbacks = [
        MLflowTrials(options.tracking_uri, plan.study.name, session,
                     Describe(plan.study.name, plan.base), options.log_checkpoints),
        Progress(plan.size, session, out=out),
        GracefulStop(session),
    ]  # fmt: skip
    if plan.study.kind == "tune" and not storage.local:
        from orchestrate.search import JournalMirror

        callbacks.append(JournalMirror(storage, session))
    return Tuner(
        trainable,
        param_space=_param_space(plan),
        tune_config=_tune_config(plan, options, storage, session),
        run_config=RunConfig(
            name=session,
            storage_path=storage.uri,
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def _publish_report(tracker, session: str, folder: Path):
    """The study report, written to ``folder`` and to the parent run; returns it and its files."""
    from orchestrate.collect import collect
    from orchestrate.report import build_report, write_report

    report = build_report(collect(tracker, session))
    paths = write_report(report, folder)
    tracker.client.log_artifacts(tracker.parent_id, str(folder))
    return report, paths


def _next_steps(options: RunOptions, experiment_id: str, paths: list, best: str | None) -> str:
    """Where to look next: the runs in MLflow's UI, the report, the registered best model."""
    from orchestrate.tracking import default_tracking_uri
    from orchestrate.ui import runs_url, ui_base

    uri = options.tracking_uri
    url = runs_url(ui_base(uri), experiment_id)
    lines = [f"\nnext: browse the runs: open {url}"]
    if not uri.startswith(("http://", "https://")):
        flag = "" if uri == default_tracking_uri() else f" --tracking-uri {uri}"
        lines[0] += f" (start the UI with: python -m orchestrate.ui{flag})"
    html = next(p for p in paths if p.name == "report.html")
    lines.append(f"report: {html}")
    if not options.log_checkpoints:
        best = "not logged (--no-log-checkpoints)"
    lines.append(f"best model: {best or 'none (the best trial on validation logged no model)'}")
    return "\n".join(lines)


def _end(opening, writer, session: str, status: str, out) -> None:
    """The parent run and every child Tune no longer runs get their terminal state, also when
    the study failed or was interrupted; what MLflow cannot take is said, not raised, so the
    first error stays the one the user sees. A further Ctrl-C waits for these few writes."""
    from orchestrate.tracking import OPENING, WRITERS

    OPENING.pop(session, None)
    WRITERS.pop(session, None)
    if opening is None or opening.exception() is not None:
        return
    tracker = opening.result()[0]
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        if status != "FINISHED":
            writer.submit("close children", lambda: _close_leftovers(tracker, session, "KILLED"))
        writer.submit("close parent", lambda: tracker.end_parent(status))
        writer.flush()
    except Exception as err:  # the writer gave up: nothing more can reach MLflow
        print(f"tracking: {err}; the runs of {session} may still show RUNNING", file=out)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _class_distribution(plan: Plan, datasets: dict) -> bytes:
    """The training split's classes before and after balancing (the paper's Figures 7, 8)."""
    from fermodel.engine import data_key, trial_splits
    from fermodel.plots import plot_class_distribution

    c = plan.configs()[0]
    data = datasets[data_key(c)]
    before = trial_splits(c, data, balanced=False).train
    after = trial_splits(c, data).train.class_counts() if c.balance else None
    with tempfile.TemporaryDirectory() as folder:
        path = plot_class_distribution(
            before.class_counts(), Path(folder) / "d.png", after=after,
            title=f"{data.name}: training split of fold {c.fold}",
        )  # fmt: skip
        return path.read_bytes()


def _open_tracking(options: RunOptions, study: Study, plan: Plan, session: str, datasets: dict,
                   distribution: bytes, writer):  # fmt: skip
    """The experiment and the parent run: a new one, or on ``--resume`` the session's own,
    reopened. Returns (tracker, parent run id, trials finished by earlier invocations)."""
    from orchestrate.collect import DISTRIBUTION_ARTIFACT, STUDY_ARTIFACT
    from orchestrate.tracking import DatasetInputs, StudyTracker

    inputs = DatasetInputs(datasets)
    tracker = writer.call(lambda: StudyTracker(options.tracking_uri, study.name, inputs))
    if options.resume and writer.call(lambda: tracker.reopen_parent(session)):
        done = writer.call(lambda: tracker.session_runs(session))
        return tracker, tracker.parent_id, sum(r.info.status == "FINISHED" for r in done)
    parent = tracker.start_parent(
        session,
        tags={"study": study.name, "dataset": study.dataset, "preset": str(plan.preset),
              "resumed": str(options.resume).lower(), "kind": study.kind},
        params={"study_file": study.path, "preset": plan.preset,
                "seeds": study.seeds_for(plan.preset),
                "dataset": study.dataset, "data_path": study.data_path,
                "protocol": study.resolved_protocol, "planned_trials": plan.size,
                "cpus_per_trial": options.cpus_per_trial,
                "gpus_per_trial": options.gpus_per_trial, "storage": options.storage,
                "tracking_uri": options.tracking_uri, "ray_address": options.address or "local"},
        config=plan.configs()[0],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, STUDY_ARTIFACT).write_text(study.path.read_text())
        Path(folder, DISTRIBUTION_ARTIFACT).write_bytes(distribution)
        tracker.client.log_artifacts(parent, folder)
    return tracker, parent, 0


def _param_space(plan: Plan) -> dict:
    from ray import tune

    if plan.study.kind == "grid":
        specs = [
            {"cell": s.cell, "seed": s.seed, "fold": s.fold, "config": s.config.to_dict()}
            for s in plan.trials
        ]
        return {"spec": tune.grid_search(specs)}
    return {}


def _tune_config(plan: Plan, options: RunOptions, storage, session: str):
    from ray.tune import TuneConfig

    from orchestrate.interrupt import PausableFIFO

    if plan.study.kind == "grid":
        return TuneConfig(
            num_samples=1,
            max_concurrent_trials=options.max_concurrent,
            reuse_actors=True,
            scheduler=PausableFIFO(session),
        )
    from orchestrate.search import FinalOnlyOptunaSearch, asha, optuna_storage, tpe

    t = plan.tune
    return TuneConfig(
        search_alg=FinalOnlyOptunaSearch(
            space=plan.study.sample,
            metric=t.metric,
            mode=t.mode,
            sampler=tpe(seed=0),
            study_name=session,
            storage=optuna_storage(storage, session),
        ),
        scheduler=asha(int(plan.base.get("epochs", 200)), t, session) or PausableFIFO(session),
        num_samples=t.num_samples,
        max_concurrent_trials=options.max_concurrent or default_concurrency(t.num_samples),
    )


def default_concurrency(num_samples: int) -> int:
    """Trials of a tuning study running at once unless --max-concurrent says: a quarter of
    them, so that TPE proposes most trials after seeing finished ones (all at once, it would
    sample every trial blind, as random search does)."""
    return max(1, math.ceil(num_samples / 4))


def _close_leftovers(tracker, session: str, status: str) -> None:
    """No run stays RUNNING: a child whose trial Tune no longer runs gets ``status``."""
    for run in tracker.session_runs(session):
        if run.info.status == "RUNNING":
            tracker.client.set_terminated(run.info.run_id, status)
