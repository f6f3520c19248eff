"""Plan a study's trials and run them on Ray Tune, tracked in MLflow.

Grid studies (the paper's tables) run every cell x seed x fold exactly once with Tune's grid
variant generator, which ``Tuner.restore`` resumes exactly. Tuning studies use Optuna's TPE
through Tune's OptunaSearch with ASHA early stopping; a trial ASHA stops early is told to Optuna
as PRUNED (its per-epoch values are reported as intermediate values), never as a COMPLETE trial
with a low-fidelity value, which would bias TPE toward configurations that merely start fast.

Everything that can be wrong with the input (study file, dataset path, tracking server) is
checked before a single MLflow run is created. Datasets are read once here, on the driver, and
reach the trials through Ray's object store (``tune.with_parameters``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from orchestrate.storage import Storage
from search_spaces import Study

SESSION_PREFIX_SEP = "__"


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
    tracking_uri: str = ""
    max_failures: int = 2
    resume: bool = False
    dry_run: bool = False
    verbose: bool = False
    log_checkpoints: bool = True


@dataclass
class Plan:
    study: Study
    preset: str | None
    trials: list  # TrialSpec for grids
    base: dict  # trial-config keys every trial shares (tuning studies sample on top)
    tune: object | None  # TuneSettings for tuning studies
    session_prefix: str

    @property
    def size(self) -> int:
        return len(self.trials) if self.study.kind == "grid" else self.tune.num_samples


def make_plan(study: Study, options: RunOptions) -> Plan:
    changes = {"epochs": options.epochs} if options.epochs else {}
    if options.gpus_per_trial == 0:
        changes["device"] = "cpu"
    base = study.base_config(options.preset, **changes)
    prefix = f"{study.name}{SESSION_PREFIX_SEP}{study.dataset}{SESSION_PREFIX_SEP}{options.preset}"
    if study.kind == "grid":
        return Plan(study, options.preset, study.trials(options.preset, **changes), base, None,
                    prefix)  # fmt: skip
    settings = study.tune_settings(options.preset)
    if options.num_samples:
        settings = replace(settings, num_samples=options.num_samples)
    return Plan(study, options.preset, [], base, settings, prefix)


def describe_plan(plan: Plan, options: RunOptions) -> str:
    study = plan.study
    lines = [
        f"study {study.name} ({study.kind}): {study.description}",
        f"dataset {study.dataset} {study.data_path or ''}, protocol {study.resolved_protocol}, "
        f"preset {plan.preset}, seeds {study.seeds}",
        f"resources per trial: {options.cpus_per_trial:g} CPU, {_gpus_text(options)}; "
        f"max concurrent: {options.max_concurrent or 'as resources allow'}",
    ]
    if study.kind == "grid":
        lines.append(f"{len(plan.trials)} trials:")
        for spec in plan.trials:
            c = spec.config
            lines.append(f"  {spec.key:34s} {c.backbone}/{c.attention}/{c.loss} "
                         f"epochs {c.epochs}, batch {c.batch_size}, lr {c.lr}")  # fmt: skip
    else:
        t = plan.tune
        lines.append(
            f"{t.num_samples} trials sampled by Optuna TPE, ASHA on {t.metric} ({t.mode}), "
            f"grace {t.grace_period} epochs, reduction {t.reduction_factor}"
        )
        for p in study.space:
            when = f" when {p.when}" if p.when else ""
            values = list(p.choices) if p.type == "categorical" else f"[{p.low}, {p.high}]"
            lines.append(f"  {p.name}: {p.type} {values}{when}")
    return "\n".join(lines)


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
        return {"name": name, "tags": tags, "params": config.to_dict()}


def load_datasets(plan: Plan) -> dict:
    """Every distinct dataset the plan's trials read, loaded once (errors surface here)."""
    from fermodel.config import TrialConfig
    from fermodel.engine import data_key, load_trial_data

    configs = [s.config for s in plan.trials] or [TrialConfig.from_dict(plan.base)]
    datasets = {}
    for config in configs:
        key = data_key(config)
        if key not in datasets:
            datasets[key] = load_trial_data(
                config, cache_dir=Path.home() / ".cache" / "fer-ablation"
            )
    return datasets


def _session(plan: Plan, storage, resume: bool) -> str:
    if resume:
        from ray.tune import Tuner

        earlier = [
            name for name in storage.sessions(plan.session_prefix + SESSION_PREFIX_SEP)
            if Tuner.can_restore(storage.join(name))
        ]  # fmt: skip
        if not earlier:
            raise FileNotFoundError(
                f"--resume: no interrupted session of {plan.session_prefix} in {storage.uri}"
            )
        return earlier[-1]
    return plan.session_prefix + SESSION_PREFIX_SEP + time.strftime("%Y%m%d-%H%M%S")


def run_study(study: Study, options: RunOptions, out=None) -> dict:
    """Run a study to the end; returns a summary (session, parent run id, table, counts)."""
    out = out or sys.stdout
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, Tuner

    from orchestrate import tracking
    from orchestrate.cluster import (
        alive_nodes,
        check_resources,
        check_storage_shared,
        cluster_has_gpus,
        quiet_ray,
        start_ray,
    )
    from orchestrate.progress import Progress
    from orchestrate.report import build_report, format_table, write_report
    from orchestrate.tracking import MLflowTrials, check_reachable
    from orchestrate.trainable import run_trial

    plan = make_plan(study, options)
    if options.dry_run:
        print(describe_plan(plan, options), file=out)
        return {"planned": plan.size}

    # everything that can be wrong is found before an MLflow run or a trial exists
    storage = Storage.parse(options.storage)
    storage.check()
    session = _session(plan, storage, options.resume)
    check_reachable(options.tracking_uri)
    datasets = load_datasets(plan)
    quiet_ray(options.verbose)
    started_ray = start_ray(options.address, options.verbose)
    opening = tracker = None
    status = "FAILED"
    try:
        if options.gpus_per_trial is None:
            options = replace(options, gpus_per_trial=1.0 if cluster_has_gpus() else 0.0)
            plan = make_plan(study, options)
        check_resources(options.cpus_per_trial, options.gpus_per_trial, options.node_timeout, out)
        if not started_ray or len(alive_nodes()) > 1:
            check_storage_shared(storage)
        # MLflow's import and a new store's migrations take seconds: open the store and the
        # parent run in a thread while Tune starts its workers; the trial callback waits for it
        distribution = _class_distribution(plan, datasets)
        opening = ThreadPoolExecutor(1, thread_name_prefix="mlflow-open").submit(
            _open_tracking, options, study, plan, session, distribution
        )
        tracking.OPENING[session] = opening
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial, datasets=datasets, base=plan.base, cpus=options.cpus_per_trial
            ),
            {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
        )
        callbacks = [
            MLflowTrials(options.tracking_uri, study.name, session, Describe(study.name, plan.base),
                         options.log_checkpoints),
            Progress(plan.size, out=out),
        ]  # fmt: skip
        path = storage.join(session)
        if options.resume:
            print(f"resuming {path}", file=out)
            tuner = Tuner.restore(path, trainable, resume_errored=True)
        else:
            tuner = Tuner(
                trainable,
                param_space=_param_space(plan),
                tune_config=_tune_config(plan, options),
                run_config=RunConfig(
                    name=session,
                    storage_path=storage.uri,
                    failure_config=FailureConfig(max_failures=options.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=1),
                    callbacks=callbacks,
                    verbose=0,
                ),
            )
        results = tuner.fit()
        tracker, parent = opening.result()
        ended = results.num_terminated + results.num_errors
        if ended < plan.size:  # Tune stops gracefully on Ctrl-C and returns what it has
            raise KeyboardInterrupt(f"{ended} of {plan.size} trials ended")
        _close_leftovers(tracker, session, results)
        report = build_report(tracker, session)
        with tempfile.TemporaryDirectory(prefix="fer-report-") as folder:
            write_report(report, folder)
            tracker.client.log_artifacts(tracker.parent_id, folder)
        print(f"\n{study.name} on {study.dataset} (preset {plan.preset}), test accuracy:", file=out)
        print(format_table(report), file=out)
        print(f"\nbrowse: mlflow ui --backend-store-uri {options.tracking_uri}", file=out)
        status = "FINISHED"
        return {"session": session, "parent_run_id": parent, "report": report,
                "table": report.table, "frame": report.trials}  # fmt: skip
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if opening is not None:
            tracking.OPENING.pop(session, None)
            if tracker is None and opening.exception() is None:
                tracker = opening.result()[0]
        if tracker is not None:
            tracker.end_parent(status)
        if started_ray:
            import ray

            ray.shutdown()


def _class_distribution(plan: Plan, datasets: dict) -> bytes:
    """The training split's classes before and after balancing (the paper's Figures 7, 8)."""
    from fermodel.config import TrialConfig
    from fermodel.data import make_splits
    from fermodel.engine import _balance_arg, data_key
    from fermodel.plots import plot_class_distribution

    c = plan.trials[0].config if plan.trials else TrialConfig.from_dict(plan.base)
    data = datasets[data_key(c)]
    before = make_splits(data, c.protocol, c.fold, c.folds, seed=c.split_seed).train
    after = None
    if c.balance:
        balanced = make_splits(data, c.protocol, c.fold, c.folds, seed=c.split_seed,
                               balance=_balance_arg(c.balance))  # fmt: skip
        after = balanced.train.class_counts()
    with tempfile.TemporaryDirectory() as folder:
        path = plot_class_distribution(
            before.class_counts(), Path(folder) / "d.png", after=after,
            title=f"{data.name}: training split of fold {c.fold}",
        )  # fmt: skip
        return path.read_bytes()


def _open_tracking(options: RunOptions, study: Study, plan: Plan, session: str, distribution):
    from orchestrate.report import DISTRIBUTION_ARTIFACT, STUDY_ARTIFACT
    from orchestrate.tracking import StudyTracker

    tracker = StudyTracker(options.tracking_uri, study.name)
    if options.resume:
        tracker.close_stale(session)
    parent = tracker.start_parent(
        session,
        tags={"study": study.name, "dataset": study.dataset, "preset": str(plan.preset),
              "resumed": str(options.resume).lower(), "kind": study.kind},
        params={"study_file": study.path, "preset": plan.preset, "seeds": study.seeds,
                "dataset": study.dataset, "data_path": study.data_path,
                "protocol": study.resolved_protocol, "planned_trials": plan.size,
                "cpus_per_trial": options.cpus_per_trial,
                "gpus_per_trial": options.gpus_per_trial, "storage": options.storage,
                "tracking_uri": options.tracking_uri, "ray_address": options.address or "local"},
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, STUDY_ARTIFACT).write_text(study.path.read_text())
        Path(folder, DISTRIBUTION_ARTIFACT).write_bytes(distribution)
        tracker.client.log_artifacts(parent, folder)
    return tracker, parent


def _param_space(plan: Plan) -> dict:
    from ray import tune

    if plan.study.kind == "grid":
        specs = [
            {"cell": s.cell, "seed": s.seed, "fold": s.fold, "config": s.config.to_dict()}
            for s in plan.trials
        ]
        return {"spec": tune.grid_search(specs)}
    return {}


def _tune_config(plan: Plan, options: RunOptions):
    from ray.tune import TuneConfig

    if plan.study.kind == "grid":
        return TuneConfig(
            num_samples=1, max_concurrent_trials=options.max_concurrent, reuse_actors=True
        )
    from ray.tune.schedulers import ASHAScheduler

    from orchestrate.search import FinalOnlyOptunaSearch

    t = plan.tune
    epochs = int(plan.base.get("epochs", 200))
    return TuneConfig(
        search_alg=FinalOnlyOptunaSearch(
            space=plan.study.sample, metric=t.metric, mode=t.mode, seed=0
        ),
        scheduler=ASHAScheduler(
            time_attr="epoch",
            metric=t.metric,
            mode=t.mode,
            # one past the last epoch: ASHA would otherwise stop every trial at its last epoch's
            # report, before the trial evaluates its test split and reports it
            max_t=epochs + 1,
            grace_period=min(t.grace_period, epochs),
            reduction_factor=t.reduction_factor,
        ),
        num_samples=t.num_samples,
        max_concurrent_trials=options.max_concurrent,
    )


def _close_leftovers(tracker, session: str, results) -> None:
    """No run stays RUNNING: a child whose trial Tune no longer runs is closed by its state."""
    errored = {r.metrics.get("trial_id") for r in results if r.error is not None}
    for run in tracker.session_runs(session):
        if run.info.status == "RUNNING":
            trial = run.data.tags.get("ray_trial_id")
            tracker.client.set_terminated(
                run.info.run_id, "FAILED" if trial in errored else "KILLED"
            )
