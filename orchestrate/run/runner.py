"""Plan a study's trials and run them on Ray Tune, tracked in MLflow.

Grid studies (the paper's tables) are sets of trial identities (``orchestrate.plan.ledger``): every
invocation runs, with Tune's grid variant generator, only the identities that have no FINISHED
run in the study's experiment, continuing unfinished ones from their newest checkpoint; adding
seeds, folds or cells to a finished study trains only what is new. Tuning studies use Optuna's TPE
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from orchestrate.plan.lease import Lease
from orchestrate.run.full_storage import StorageFull
from orchestrate.store.storage import Storage
from search_spaces import Study


@dataclass
class RunOptions:
    preset: str | None = None
    epochs: int | None = None
    num_samples: int | None = None
    gpus_per_trial: float | None = 0.0  # None: 1 when the cluster has GPUs, else 0
    cpus_per_trial: float = 1.0
    pack: int | None = 1  # grid trials per Tune trial; None: measured on a GPU (1 without one)
    max_concurrent: int | None = None
    address: str | None = None
    storage: str = "ray_results"  # a folder, or a URI such as s3://bucket/prefix
    node_timeout: float = 600.0  # how long to wait for an autoscaler to start a big enough node
    mlflow_retry_budget: float = 1800.0  # longest MLflow outage the writer waits through
    pretrained: str | None = None  # replaces the study's: a file, a folder, or "" (none)
    tracking_uri: str = ""
    max_failures: int = 2
    resume: bool = False  # tuning: insist on continuing a session (grids always continue)
    retry_failed: bool = False  # grids: run again the trials whose loss diverged before
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


def _drawings(study) -> str:
    drawn = len(study.repetition_ids)
    return f" (repeated: folds drawn {drawn} times)" if drawn > 1 else ""


def describe_plan(plan: Plan, options: RunOptions, fates: list | None = None) -> str:
    """What the study plans; for a grid, what each trial does (its ``fates``) and why."""
    study = plan.study
    lines = [
        f"study {study.name} ({study.kind}): {study.description}",
        f"dataset {study.dataset} {study.data_path or ''}, protocol {study.resolved_protocol}"
        f"{_drawings(study)}, preset {plan.preset}, seeds {study.seeds_for(plan.preset)}",
        f"resources per trial: {options.cpus_per_trial:g} CPU, {_gpus_text(options)}; "
        f"max concurrent: {options.max_concurrent or 'as resources allow'}",
        "initialisation: "
        + {
            IMAGENET: "ImageNet (give --pretrained FILE|FOLDER, or none)",
            "": "random (no pretrained weights)",
        }.get(plan.base.get("pretrained", ""), f"from {plan.base.get('pretrained')}"),
    ]
    if study.kind == "grid":
        from orchestrate.plan.ledger import describe_fates

        lines.append(f"{len(plan.trials)} trials: " + describe_fates(fates))
    else:
        from search_spaces.study import asha_rungs as rungs

        t = plan.tune
        epochs = int(plan.base.get("epochs", 200))
        stops = rungs(epochs, t.grace_period, t.reduction_factor)
        goals = ", ".join(f"{m} ({mode})" for m, mode in t.goals)
        lines.append(
            f"{t.num_samples} trials sampled by Optuna TPE, "
            f"{options.max_concurrent or default_concurrency(t.num_samples)} at a time; "
            f"{'MO-ASHA' if len(t.goals) > 1 else 'ASHA'} on {goals}, grace {t.grace_period}, "
            f"reduction {t.reduction_factor}: "
            + (
                f"may stop trials after epochs {', '.join(map(str, stops))} of {epochs}"
                if stops
                else f"no rung before the last of {epochs} epochs, no early stopping"
            )
        )
        if t.constraints:
            lines.append(
                "constraints (a trial that breaks one is infeasible): "
                + ", ".join(map(str, t.constraints))
            )
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
    """Tags and params of a trial's MLflow run, from its Tune config (picklable): a grid's
    pack member ``index``, or a tuning sample (``index`` None)."""

    def __init__(self, study: str, base: dict):
        self.study, self.base = study, base

    def __call__(self, params: dict, index: int | None = None) -> dict:
        from orchestrate.plan.packing import member_specs
        from orchestrate.run.trainable import trial_config
        from search_spaces.study import trial_key

        config, place = trial_config(params, self.base, index)
        name = trial_key(**place)
        tags = {"study": self.study, **place}
        if index is not None:
            from orchestrate.plan.ledger import IDENTITY_TAG

            specs = member_specs(params)
            tags[IDENTITY_TAG] = specs[index]["identity"]
            if len(specs) > 1:
                tags.update(pack_member=index, pack_size=len(specs))
        else:
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


@dataclass
class Invocation:
    """One invocation of a study, as it is prepared and run (handed from step to step)."""

    plan: Plan
    options: RunOptions
    storage: Storage
    session: str
    writer: object  # orchestrate.store.tracking.Writer
    resumed: bool = False  # a tuning session restored from its storage
    lease: Lease | None = None  # this study's, once every check has passed
    fates: list = field(default_factory=list)  # grids: every planned trial's fate
    tracker: object = None  # orchestrate.store.tracking.StudyTracker, once the store is open
    earlier: int = 0  # trials finished before this invocation

    @property
    def to_run(self) -> list:
        return [f for f in self.fates if f.runs]

    @property
    def log_file(self) -> Path:
        """Where Ray's tracebacks of failed trials go (created by the first)."""
        return Path(self.options.reports) / self.session / "ray.log"

    @property
    def size(self) -> int:
        """Trials this invocation's Tune run holds."""
        return len(self.to_run) if self.plan.study.kind == "grid" else self.plan.size


def run_study(study: Study, options: RunOptions, out=None) -> dict:
    """Run a study to the end; returns a summary (session, parent run id, report, table, model).
    A study stopped by SIGINT or SIGTERM raises ``orchestrate.run.interrupt.Interrupted`` (a
    KeyboardInterrupt) after marking its open runs KILLED."""
    out = out or sys.stdout
    from orchestrate.store.tracking import Writer, check_reachable

    plan = make_plan(study, options)
    if options.dry_run:
        print(describe_plan(plan, options, _dry_run_fates(plan, options)), file=out)
        return {"planned": plan.size}

    # everything that can be wrong is found before an MLflow run or a trial exists
    check_pretrained(plan)
    storage = Storage.parse(options.storage)
    storage.check()
    if options.resume and study.kind == "grid":
        _check_something_to_continue(plan, options)
    session, resumed = _session(plan, options, storage)
    check_reachable(options.tracking_uri)
    Lease.check(storage, study.name)  # a running study refuses a second invocation at once
    datasets = load_datasets(plan)
    inv = Invocation(
        plan, options, storage, session, Writer(budget=options.mlflow_retry_budget), resumed
    )
    return _run(inv, datasets, out)


def _run(inv: Invocation, datasets: dict, out) -> dict:
    """Ray started (or joined), the study's lease, its Tune run, its report; every run closed
    and the lease released at the end."""
    from orchestrate.run.cluster import quiet_ray, start_ray, tune_errors_to
    from orchestrate.run.interrupt import on_sigterm_before_tune

    options = inv.options
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm_before_tune) if main else None
    quiet_ray(options.verbose)
    if not options.verbose:  # Optuna's INFO lines ("A new study created ...") are not the study's
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    started_ray = start_ray(options.address, options.verbose)
    if main:  # after Ray, whose core worker put its own handler in
        signal.signal(signal.SIGTERM, on_sigterm_before_tune)
    status = "FAILED"
    try:
        _prepare(inv, datasets, started_ray, out)
        if inv.size:
            with tune_errors_to(inv.log_file, options.verbose):
                _fit(inv, datasets, out)
        inv.writer.flush()
        _raise_if_interrupted(inv)
        summary = _finish(inv, out)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except StorageFull:
        _report_what_can_be(inv, out)
        raise
    finally:
        _end(inv, status, out)
        if started_ray:
            import ray

            ray.shutdown()
        if inv.lease is not None:
            inv.lease.release()
        if main:
            signal.signal(signal.SIGTERM, previous)


def _session(plan: Plan, options: RunOptions, storage: Storage) -> tuple[str, bool]:
    """The Tune session this invocation runs in, and whether it continues an earlier one: a
    grid always starts one (its trials continue by identity); a tuning study continues the
    newest unfinished session with the same plan (``--resume`` insists on one)."""
    from orchestrate.plan import sessions

    if plan.study.kind == "grid":
        return sessions.new_session(plan), False
    try:
        return sessions.resumable(plan, storage), True
    except (FileNotFoundError, ValueError):
        if options.resume:
            raise
        return sessions.new_session(plan), False


def _check_something_to_continue(plan: Plan, options: RunOptions) -> None:
    """``--resume`` on a grid whose plan has never run: said, like a tuning study's (exit 2),
    instead of silently starting every trial."""
    from orchestrate.store.tracking import mask

    if all(f.reason == "new" for f in _dry_run_fates(plan, options)):
        raise FileNotFoundError(
            f"--resume: no trial of study {plan.study.name}'s plan has run in "
            f"{mask(options.tracking_uri)}, so there is nothing to continue; run without "
            f"--resume to start it"
        )


def _dry_run_fates(plan: Plan, options: RunOptions) -> list | None:
    """What a grid's trials would do, read from the store without creating it (None: tuning)."""
    if plan.study.kind != "grid":
        return None
    from orchestrate.plan.ledger import Fate, plan_fates
    from orchestrate.store.tracking import StudyTracker, check_reachable

    uri = options.tracking_uri
    store = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if store is not None and not store.is_file():
        return [Fate(spec, "run", "new") for spec in plan.trials]
    check_reachable(uri)
    from mlflow.tracking import MlflowClient

    if MlflowClient(uri).get_experiment_by_name(plan.study.name) is None:
        return [Fate(spec, "run", "new") for spec in plan.trials]
    tracker = StudyTracker(uri, plan.study.name)
    return plan_fates(plan.trials, tracker, Storage.parse(options.storage), options.retry_failed)


def _prepare(inv: Invocation, datasets: dict, private_ray: bool, out) -> None:
    """Resources, shared storage, the MLflow store and parent run, and (grids) the fates."""
    from orchestrate.plan import ledger, sessions
    from orchestrate.run import interrupt
    from orchestrate.run.cluster import (
        alive_nodes,
        check_resources,
        check_storage_shared,
        cluster_has_gpus,
    )
    from orchestrate.store.tracking import DatasetInputs, StudyTracker

    options, study = inv.options, inv.plan.study
    if options.gpus_per_trial is None:
        inv.options = options = replace(options, gpus_per_trial=1.0 if cluster_has_gpus() else 0)
        inv.plan = make_plan(study, options)
    check_resources(options.cpus_per_trial, options.gpus_per_trial, options.node_timeout, out)
    if not private_ray or len(alive_nodes()) > 1:
        check_storage_shared(inv.storage)
    # the last check, the first write: LeaseHeld when another invocation runs this study
    inv.lease = Lease.acquire(inv.storage, study.name, inv.session, out)
    interrupt.clear(inv.storage.join(inv.session))  # a flag of an earlier invocation
    inv.tracker = inv.writer.call(
        lambda: StudyTracker(options.tracking_uri, study.name, DatasetInputs(datasets))
    )
    if study.kind == "grid":
        inv.fates = inv.writer.call(
            lambda: ledger.plan_fates(
                inv.plan.trials, inv.tracker, inv.storage, options.retry_failed
            )
        )
        inv.earlier = sum(f.action == "finished" for f in inv.fates)
        print(ledger.describe_fates(inv.fates, only_notable=True), file=out)
        if options.pack is None:
            inv.options = options = replace(options, pack=_auto_pack(inv, datasets, out))
        inv.writer.call(lambda: ledger.close_stale(inv.tracker, inv.fates, inv.session))
    if not inv.resumed:
        sessions.write_plan(inv.storage, inv.session, inv.plan)
    distribution = _class_distribution(inv.plan, datasets)
    inv.writer.call(lambda: _open_parent(inv, distribution))


def _auto_pack(inv: Invocation, datasets: dict, out) -> int:
    """``--pack auto``: 1 without GPUs; on GPUs measured for the first trial to run."""
    from fermodel.engine import data_key
    from orchestrate.run.trainable import measure_size

    options = inv.options
    if not options.gpus_per_trial or len(inv.to_run) < 2:
        return 1
    config = inv.to_run[0].spec.config
    k, measured = measure_size(
        config.to_dict(), datasets[data_key(config)], options.gpus_per_trial, len(inv.to_run)
    )
    shown = ", ".join(f"{size}: {rate:,.0f}" for size, rate in measured.items())
    print(f"pack: {k} trials per pack (images/s by pack size, measured: {shown})", file=out)
    return k


def _fit(inv: Invocation, datasets: dict, out) -> None:
    """Tune's run; a storage found full on the way (by a trial or by the driver) ends it as
    ``StorageFull`` (``orchestrate.run.full_storage``), whatever Tune raised after it."""
    from orchestrate.run.full_storage import FULL, no_space

    FULL.pop(inv.session, None)
    try:
        _tuner(inv, datasets, out).fit()
    except Exception as err:
        if inv.session not in FULL and not no_space(err):
            raise
        FULL.setdefault(inv.session, str(err))
    if inv.session in FULL:
        raise StorageFull.of(inv.storage.uri, FULL.pop(inv.session))


def _report_what_can_be(inv: Invocation, out) -> None:
    """A study stopped early (its storage full): its runs closed, its table printed and its
    report written from what MLflow holds, as far as the disks allow."""
    from orchestrate.report.render import format_table

    tracker, writer, session = inv.tracker, inv.writer, inv.session
    try:
        writer.flush()
        writer.call(lambda: _close_leftovers(tracker, session, "KILLED"))
        folder = Path(inv.options.reports) / session
        report, paths = writer.call(lambda: _publish_report(tracker, session, folder))
        print("\n" + format_table(report), file=out)
        print(f"report: {next(p for p in paths if p.name == 'report.html')}", file=out)
    except Exception as err:  # the report is a courtesy here: the stop is the message
        print(f"report: not written ({str(err).splitlines()[0][:300]})", file=out)


def _raise_if_interrupted(inv: Invocation) -> None:
    from orchestrate.run.interrupt import INTERRUPTED, Interrupted

    if inv.session in INTERRUPTED:  # Tune stopped gracefully on the signal and returned
        raise Interrupted(INTERRUPTED[inv.session])


def _finish(inv: Invocation, out) -> dict:
    """Close what is left, write and log the report, register the best model, say where."""
    from orchestrate.plan import sessions
    from orchestrate.report.render import format_table
    from orchestrate.store.tracking import FEASIBLE_ALIAS, register_best, tag_tuning

    tracker, writer, session = inv.tracker, inv.writer, inv.session
    writer.call(lambda: _close_leftovers(tracker, session, "FAILED"))
    folder = Path(inv.options.reports) / session
    report, paths = writer.call(lambda: _publish_report(tracker, session, folder))
    finished = (
        list(report.trials[report.trials.status == "FINISHED"].run_id) if len(report.trials) else []
    )
    best = feasible = None
    if inv.options.log_checkpoints and finished:
        best = writer.call(lambda: register_best(tracker, session, finished))
    if (tuning := report.tuning) is not None:
        writer.call(lambda: tag_tuning(tracker, tuning))
        if inv.options.log_checkpoints and tuning.constraints and tuning.best:
            chosen = f"best {tuning.goals[0][0]} with {'; '.join(tuning.constraints)}"
            feasible = writer.call(
                lambda: register_best(
                    tracker, session, [tuning.best["run_id"]], FEASIBLE_ALIAS, chosen
                )
            )
    sessions.mark_finished(inv.storage, session, {"parent_run_id": tracker.parent_id})
    print("\n" + format_table(report), file=out)
    if not finished:
        print("\n" + _nothing_finished(inv, len(report.trials)), file=out)
    if note := writer.summary():
        print(f"\ntracking: {note}", file=out)
    if not finished:
        best = "none (no trial finished)"
    print(_next_steps(inv.options, tracker.experiment_id, paths, best), file=out)
    if feasible:
        print(f"best feasible model ({'; '.join(report.tuning.constraints)}): {feasible}", file=out)
    return {
        "session": session,
        "parent_run_id": tracker.parent_id,
        "report": report,
        "table": report.table,
        "frame": report.trials,
        "model": best,
        "finished": len(finished),
        "failed": _failed_by_errors(report.trials),
    }


def _failed_by_errors(trials) -> int:
    """Trials that ended FAILED by an error (after their retries), not by diverging: a
    divergence is a result of training."""
    from orchestrate.store.tracking import failure_reason

    if trials.empty:
        return 0
    failed = trials[trials.status == "FAILED"]
    return sum(failure_reason(text) != "divergence" for text in failed.error)


def _nothing_finished(inv: Invocation, trials: int) -> str:
    where = f"; their tracebacks are in {inv.log_file}" if inv.log_file.is_file() else ""
    return f"No trial of this study has finished: {trials} planned, none succeeded{where}."


def _tuner(inv: Invocation, datasets: dict, out):
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, Tuner

    from orchestrate.run.callbacks import (
        CheckpointIndex,
        GracefulStop,
        JournalMirror,
        MLflowTrials,
        Progress,
    )
    from orchestrate.run.full_storage import FullStorageStop, FullStorageWatch
    from orchestrate.run.trainable import run_pack, run_trial
    from orchestrate.store.tracking import LIVE

    plan, options, storage, session = inv.plan, inv.options, inv.storage, inv.session
    LIVE[session] = inv
    path = storage.join(session)
    run = run_pack if plan.study.kind == "grid" else run_trial
    trainable = tune.with_resources(
        tune.with_parameters(
            run,
            datasets=datasets,
            base=plan.base,
            cpus=options.cpus_per_trial,
            gpus=options.gpus_per_trial,
            session_uri=path,
            storage_uri=storage.uri,
        ),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
    )
    if inv.resumed:
        print(f"continuing {path}", file=out)
        return Tuner.restore(path, trainable, resume_errored=True)
    callbacks = [
        MLflowTrials(
            options.tracking_uri,
            plan.study.name,
            session,
            Describe(plan.study.name, plan.base),
            options.log_checkpoints,
        ),
        Progress(
            len(inv.fates) or plan.size,
            session,
            earlier=inv.earlier,
            out=out,
            log=str(inv.log_file),
        ),
        CheckpointIndex(storage.uri),  # before the stop that a checkpoint may set off
        GracefulStop(session, path),
        FullStorageWatch(session),
    ]
    if plan.study.kind == "tune" and not storage.local:
        callbacks.append(JournalMirror(storage, session))
    return Tuner(
        trainable,
        param_space=_param_space(inv, datasets),
        tune_config=_tune_config(plan, options, storage, session),
        run_config=RunConfig(
            name=session,
            storage_path=storage.uri,
            failure_config=FailureConfig(max_failures=options.max_failures),
            stop=FullStorageStop(session),
            checkpoint_config=CheckpointConfig(num_to_keep=2),  # one to fall back on
            callbacks=callbacks,
            verbose=0,
        ),
    )


def _publish_report(tracker, session: str, folder: Path):
    """The study report, written to ``folder`` and to the parent run; returns it and its files."""
    from orchestrate.report.build import build_report, write_report
    from orchestrate.report.collect import collect

    report = build_report(collect(tracker, session))
    paths = write_report(report, folder)
    tracker.client.log_artifacts(tracker.parent_id, str(folder))
    return report, paths


def _next_steps(options: RunOptions, experiment_id: str, paths: list, best: str | None) -> str:
    """Where to look next: the runs in MLflow's UI, the report, the registered best model."""
    from orchestrate.store.tracking import default_tracking_uri
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


def _end(inv: Invocation, status: str, out) -> None:
    """The parent run and every child Tune no longer runs get their terminal state, also when
    the study failed or was interrupted; what MLflow cannot take is said, not raised, so the
    first error stays the one the user sees. A further signal waits for these few writes."""
    from orchestrate.store.tracking import LIVE

    LIVE.pop(inv.session, None)
    tracker, writer, session = inv.tracker, inv.writer, inv.session
    if tracker is None or tracker.parent_id is None:
        return
    main = threading.current_thread() is threading.main_thread()
    previous = {}
    if main:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if status != "FINISHED":
            writer.submit("close children", lambda: _close_leftovers(tracker, session, "KILLED"))
        writer.submit("close parent", lambda: tracker.end_parent(status))
        writer.flush()
    except Exception as err:  # the writer gave up: nothing more can reach MLflow
        print(f"tracking: {err}; the runs of {session} may still show RUNNING", file=out)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
            before.class_counts(),
            Path(folder) / "d.png",
            after=after,
            title=f"{data.name}: training split of fold {c.fold}",
        )
        return path.read_bytes()


def _open_parent(inv: Invocation, distribution: bytes) -> None:
    """The invocation's parent run: a new one, or for a continued tuning session its own,
    reopened (then ``inv.earlier`` counts the trials it finished before)."""
    import json

    from orchestrate.report.collect import DISTRIBUTION_ARTIFACT, PLAN_ARTIFACT, STUDY_ARTIFACT

    tracker, plan, options, study = inv.tracker, inv.plan, inv.options, inv.plan.study
    if inv.resumed and tracker.reopen_parent(inv.session):
        done = tracker.session_runs(inv.session)
        inv.earlier = sum(r.info.status == "FINISHED" for r in done)
        return
    parent = tracker.start_parent(
        inv.session,
        tags={
            "study": study.name,
            "dataset": study.dataset,
            "preset": str(plan.preset),
            "resumed": str(inv.resumed).lower(),
            "kind": study.kind,
        },
        params={
            "study_file": study.path,
            "preset": plan.preset,
            "seeds": study.seeds_for(plan.preset),
            "dataset": study.dataset,
            "data_path": study.data_path,
            "protocol": study.resolved_protocol,
            "planned_trials": plan.size,
            "trials_to_run": inv.size,
            "cpus_per_trial": options.cpus_per_trial,
            "gpus_per_trial": options.gpus_per_trial,
            "storage": options.storage,
            "tracking_uri": options.tracking_uri,
            "ray_address": options.address or "local",
        },
        config=plan.configs()[0],
    )
    inv.lease.update(parent_run=parent)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, STUDY_ARTIFACT).write_text(study.path.read_text())
        Path(folder, DISTRIBUTION_ARTIFACT).write_bytes(distribution)
        if study.kind == "grid":
            plan_file = {
                "identities": [f.spec.identity for f in inv.fates],
                "trials": {
                    f.spec.identity: {"key": f.spec.key, "action": f.action, "reason": f.reason}
                    for f in inv.fates
                },
            }
            Path(folder, PLAN_ARTIFACT).write_text(json.dumps(plan_file, indent=1))
        tracker.client.log_artifacts(parent, folder)


def _param_space(inv: Invocation, datasets: dict) -> dict:
    """A grid's Tune trials, each a pack of its trials (``orchestrate.plan.packing``)."""
    from ray import tune

    from orchestrate.plan.packing import pack_fates

    if inv.plan.study.kind == "grid":
        packs = pack_fates(inv.to_run, inv.options.pack or 1, datasets)
        return {"members": tune.grid_search([[_spec(f) for f in pack] for pack in packs])}
    return {}


def _spec(f) -> dict:
    """A grid trial as its Tune config holds it: place, identity, where it continues from."""
    return {
        "cell": f.spec.cell,
        "seed": f.spec.seed,
        "fold": f.spec.fold,
        "identity": f.spec.identity,
        "resume_from": f.checkpoint,
        "older": [list(entry) for entry in f.older],
        "continues": {"run": f.run_id, "epoch": f.epoch} if f.checkpoint else None,
        "config": f.spec.config.to_dict(),
    }


def _tune_config(plan: Plan, options: RunOptions, storage, session: str):
    from ray.tune import TuneConfig

    from orchestrate.run.interrupt import PausableFIFO

    if plan.study.kind == "grid":
        return TuneConfig(
            num_samples=1,
            max_concurrent_trials=options.max_concurrent,
            reuse_actors=True,
            scheduler=PausableFIFO(session),
            trial_dirname_creator=trial_folder,
        )
    from orchestrate.run.search import FinalOnlyOptunaSearch, asha, optuna_storage, tpe

    t = plan.tune
    metrics, modes = zip(*t.goals, strict=True)
    several = len(t.goals) > 1
    return TuneConfig(
        search_alg=FinalOnlyOptunaSearch(
            space=plan.study.sample,
            metric=list(metrics) if several else metrics[0],
            mode=list(modes) if several else modes[0],
            sampler=tpe(seed=0),
            study_name=session,
            storage=optuna_storage(storage, session),
            constraints=t.constraints,
        ),
        scheduler=asha(int(plan.base.get("epochs", 200)), t, session) or PausableFIFO(session),
        num_samples=t.num_samples,
        max_concurrent_trials=options.max_concurrent or default_concurrency(t.num_samples),
        trial_dirname_creator=trial_folder,
    )


def trial_folder(trial) -> str:
    """A Tune trial's folder in the storage: its trainable and id (Tune's default appends the
    whole config, a pack's members included, which makes paths hundreds of characters long)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


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
