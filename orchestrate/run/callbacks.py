"""The study's Tune callbacks: everything that reacts to Tune's trial events, in the driver.

- ``MLflowTrials``: the child runs of the trials in MLflow, written through the invocation's
  writer (``orchestrate.store.tracking``).
- ``CheckpointIndex``: where each trial identity's newest checkpoint lies
  (``orchestrate.plan.ledger``), for the next invocation.
- ``Progress``: one line per trial event, best so far on validation (never test).
- ``GracefulStop``: SIGINT and SIGTERM checkpoint running trials first
  (``orchestrate.run.interrupt``).
- ``JournalMirror``: a tuning study's Optuna journal copied into an object-store session.

Tune pickles its callbacks with the experiment and restores them with a session, so none keeps
a connection or a thread across that; they find the live invocation in ``tracking.LIVE``.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow.entities import Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

from fermodel.engine import ARCHITECTURE_COST
from orchestrate.plan.ledger import remember
from orchestrate.plan.packing import member_results, member_specs, members_of
from orchestrate.run.interrupt import FLAG, INTERRUPTED, TERM_GRACE, Interrupted
from orchestrate.run.search import JOURNAL, LOCAL_JOURNALS
from orchestrate.store.storage import Storage
from orchestrate.store.tracking import (
    EPOCH_KEYS,
    FINAL_KEYS,
    LIVE,
    MEMBER_TAG,
    PARENT_TAG,
    SESSION_TAG,
    TRIAL_TAG,
    copy_epochs,
    failure_reason,
    log_metrics,
    log_model,
    mask,
    source_tags,
)


class MLflowTrials(Callback):
    """Child runs of the trials, written from the driver as Tune reports them: one run per
    tuning sample, and one per member of a grid's Tune trial (a pack of one or more trials,
    its results keyed by member index; see ``orchestrate.run.trainable.run_pack``).

    Every event only queues its writes on the invocation's ``Writer`` (``LIVE``), so MLflow's
    latency and outages never stall Tune's scheduling loop; the writes of one trial happen in
    the order of its events. Tune pickles its callbacks with the experiment and restores them
    on ``--resume``, so this one keeps no connection, writer or run id across that.
    """

    def __init__(self, uri: str, study: str, session: str, describe, log_checkpoints=True):
        self.uri, self.study, self.session = uri, study, session
        self.describe, self.log_checkpoints = describe, log_checkpoints
        self.client = self.tracker = None
        self.runs: dict[tuple, str] = {}  # (Ray trial id, member) -> MLflow run id (writer)
        self.ended: set[tuple] = set()  # members whose run has its terminal state
        self.hosts: dict[tuple, str] = {}  # (Ray trial id, member) -> the host tagged on its run
        self.costed: set[tuple] = set()  # members whose run has its architecture's cost
        self.continuing: dict[str, dict] = {}  # run id -> the run and epoch it continues

    def __getstate__(self):
        return {
            **self.__dict__,
            "client": None,
            "tracker": None,
            "runs": {},
            "ended": set(),
            "hosts": {},
            "costed": set(),
            "continuing": {},
        }

    def _submit(self, what: str, write) -> None:
        LIVE[self.session].writer.submit(what, write)

    # ------------------------------------------------------------- Tune's events (loop)

    def on_trial_start(self, iteration, trials, trial, **info):
        tid, config = trial.trial_id, dict(trial.config)
        number = tuned_name(trial)
        for member in members_of(config):
            self._submit(f"start {tid}", lambda m=member: self._run_for(tid, config, m, number))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid, config, result = trial.trial_id, dict(trial.config), dict(result)
        host = result.get("hostname")  # Tune fills it in on the node that trained the epoch
        for member, values in member_results(result):
            self._submit(
                f"result {tid}",
                lambda m=member, v=values: self._log_result(
                    tid, config, m, v, bool(result.get("completed")), host
                ),
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid, config = trial.trial_id, dict(trial.config)
        last, checkpoint = dict(trial.last_result or {}), trial.checkpoint
        results = dict(member_results(last))
        for member in members_of(config):
            values = results.get(member, {})
            self._submit(
                f"end {tid}",
                lambda m=member, v=values: self._complete(
                    tid, config, m, v, bool(last.get("completed")), checkpoint
                ),
            )

    def on_trial_error(self, iteration, trials, trial, **info):
        tid, config, text = trial.trial_id, dict(trial.config), error_text(trial)
        for member in members_of(config):
            self._submit(f"error {tid}", lambda m=member: self._fail(tid, config, m, text))

    # --------------------------------------------------------------- writes (writer thread)

    def _connect(self) -> None:
        if self.client is not None:
            return
        self.tracker = LIVE[self.session].tracker
        self.client = self.tracker.client

    def _run_for(self, trial_id: str, config: dict, member, tuned: str = "") -> str:
        self._connect()
        if (trial_id, member) in self.runs:
            return self.runs[trial_id, member]
        which = f"tags.{TRIAL_TAG} = '{trial_id}' and tags.{SESSION_TAG} = '{self.session}'"
        if member is not None:
            which += f" and tags.{MEMBER_TAG} = '{member}'"
        existing = self.client.search_runs(
            [self.tracker.experiment_id], filter_string=which, max_results=1
        )
        if existing:  # a resumed trial continues its own run
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self._new_run(trial_id, config, member, tuned)
        self.runs[trial_id, member] = run_id
        return run_id

    def _new_run(self, trial_id: str, config: dict, member, tuned: str) -> str:
        info = self.describe(config, member)
        name = info["name"]
        if member is None:  # a tuning sample
            name = tuned or f"tuned-{trial_id}"
        tags = {
            MLFLOW_PARENT_RUN_ID: self.tracker.parent_id,
            MLFLOW_RUN_NAME: name,
            SESSION_TAG: self.session,
            PARENT_TAG: "false",
            TRIAL_TAG: trial_id,
            **source_tags(),
            **{k: str(v) for k, v in info["tags"].items()},
        }
        continues = None
        if member is not None:
            tags[MEMBER_TAG] = str(member)
            continues = member_specs(config)[member].get("continues")
        if continues:
            tags["continues_run"] = continues["run"]
            tags["continues_after_epoch"] = str(continues["epoch"])
        run_id = self.client.create_run(self.tracker.experiment_id, tags=tags).info.run_id
        params = [Param(k, mask(str(v))) for k, v in info["params"].items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[start : start + 100])
        self.tracker.log_input(run_id, info["config"])
        if continues:  # copied at its first result, which says after which epoch it went on
            self.continuing[run_id] = continues
        return run_id

    def _log_result(
        self, trial_id, config: dict, member, result: dict, completed: bool, host: str | None
    ) -> None:
        if (trial_id, member) in self.ended:
            return
        if "diverged" in result:  # a pack member that diverged; the others go on
            self._fail(trial_id, config, member, f"TrainingDiverged: {result['diverged']}")
            return
        run_id = self._run_for(trial_id, config, member)
        if (continues := self.continuing.pop(run_id, None)) is not None:
            # the epochs before its checkpoint, so that the run shows the whole trial; an older
            # one than planned when the newest was damaged (from scratch: none)
            epoch = int(result.get("continued_after_epoch", continues["epoch"]))
            if epoch != continues["epoch"]:
                self.client.set_tag(run_id, "continues_after_epoch", str(epoch))
            copy_epochs(self.client, continues["run"], run_id, epoch)
        if host and self.hosts.get((trial_id, member)) != host:
            # where a running trial trains now, in the UI while it runs (it moves with a lost node)
            self.client.set_tag(run_id, "host", host)
            self.hosts[trial_id, member] = host
        step = int(result.get("epoch", 0))
        if completed:
            final = {k: v for k, v in result.items() if FINAL_KEYS.match(k)}
            log_metrics(self.client, run_id, final, step=step)
            # which Ray node ran the trial's last attempt, and how (CUDA graphs, packing off...)
            tags = {"ray_node_id": result.get("node_id"), "notes": result.get("notes")}
            tags = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v]
            if tags:
                self.client.log_batch(run_id, tags=tags)
        else:
            epoch = {k: v for k, v in result.items() if EPOCH_KEYS.match(k)}
            if (trial_id, member) not in self.costed:  # a trial stopped early has it too
                epoch.update({k: result[k] for k in ARCHITECTURE_COST if k in result})
                self.costed.add((trial_id, member))
            log_metrics(self.client, run_id, epoch, step=step)

    def _complete(
        self, trial_id, config: dict, member, last: dict, completed: bool, checkpoint
    ) -> None:
        if (trial_id, member) in self.ended:
            return
        run_id = self._run_for(trial_id, config, member)
        if checkpoint is not None and completed:
            self._log_artifacts(run_id, config, member, checkpoint, int(last.get("best_epoch", 0)))
        if not completed:
            self.client.set_tag(run_id, "stopped_early", "true")
            if (seconds := last.get("time_total_s")) is not None:  # Tune's clock: what it cost
                log_metrics(
                    self.client,
                    run_id,
                    {"trial_seconds": float(seconds)},
                    step=int(last.get("epoch", 0)),
                )
        self.client.set_terminated(run_id, "FINISHED")
        self.ended.add((trial_id, member))

    def _fail(self, trial_id: str, config: dict, member, text: str) -> None:
        if (trial_id, member) in self.ended:
            return
        run_id = self._run_for(trial_id, config, member)
        tags = {"error": text, "failure_reason": failure_reason(text)}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run_id, "FAILED")
        self.ended.add((trial_id, member))

    def _log_artifacts(
        self, run_id: str, config: dict, member, checkpoint, best_epoch: int
    ) -> None:
        """The final checkpoint's files as artifacts (a pack member's from its subfolder),
        then its selected weights as the run's MLflow model (unless --no-log-checkpoints); a
        model that cannot be logged leaves the rest logged and the run FINISHED."""
        import torch

        from orchestrate.run.trainable import BEST_MODEL_FILE

        with tempfile.TemporaryDirectory(prefix="fer-artifacts-") as root:
            checkpoint.to_directory(root)
            folder = Path(root) if member is None else Path(root) / str(member)
            weights, state = folder / BEST_MODEL_FILE, None
            if self.log_checkpoints and weights.is_file():
                state = torch.load(weights, map_location="cpu", weights_only=True)
            weights.unlink(missing_ok=True)
            (folder / "state.pt").unlink(missing_ok=True)
            self.client.log_artifacts(run_id, str(folder))
            if state is not None:
                classes = json.loads((folder / "predictions.json").read_text())["classes"]
                log_model(
                    self.uri,
                    run_id,
                    self.describe(config, member)["config"],
                    classes,
                    state,
                    step=best_epoch,
                )


def error_text(trial) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[-1][:5000]
    return "trial failed (no error message recorded)"


class CheckpointIndex(Callback):
    """Records, for every trial, the newest checkpoint Tune persisted in the storage, so that a
    later invocation continues the trial from it (Tune's own state serves only its session)."""

    def __init__(self, storage_uri: str):
        self.storage_uri = storage_uri

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """Each pack member present in the checkpoint (its subfolder) gets its entry."""
        specs = member_specs(trial.config)
        if checkpoint is None or not specs:
            return
        last = trial.last_result or {}
        storage = Storage(self.storage_uri)
        for member, values in member_results(last):
            if "diverged" in values or member is None:
                continue
            entry = {
                "path": f"{checkpoint.path}/{member}",
                "epoch": int(last.get("epoch", 0)),
                "trial": trial.trial_id,
            }
            remember(storage, specs[member]["identity"], entry)


class Progress(Callback):
    """One line per trial event (each member of a grid's pack its own), counting from the
    ``earlier`` trials finished by earlier invocations (a continued tuning session, restored by
    Tune, reads them from the invocation)."""

    def __init__(self, planned: int, session: str, earlier: int = 0, out=None, log: str = ""):
        self.planned, self.session, self.earlier, self.out = planned, session, earlier, out
        self.log = log  # where the tracebacks of failed trials are
        self.started = time.monotonic()
        self.running: set[tuple] = set()
        self.done = self.failed = 0
        self.best: tuple[float, str] | None = None

    def __getstate__(self):
        return {**self.__dict__, "out": None}

    def setup(self, **info):
        self.out = self.out or sys.stdout
        self.started = time.monotonic()
        self.running = set()
        from orchestrate.store.tracking import LIVE

        if self.session in LIVE:
            self.earlier = LIVE[self.session].earlier
        self.done, self.failed = self.earlier, 0

    def _print(self, event: str) -> None:
        best = f"; best validation {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        elapsed = time.monotonic() - self.started
        print(
            f"[{elapsed:6.0f}s] {self.done}/{self.planned} done, {len(self.running)} running, "
            f"{self.failed} failed{best}  <- {event}",
            file=self.out,
            flush=True,
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        members = members_of(trial.config)
        for member in members:
            self.running.add((trial.trial_id, member))
        names = ", ".join(_name(trial, m) for m in members)
        if members == [None]:  # a tuning sample: what it tries
            names += f" ({sampled_text(trial.config)})"
        self._print(f"started {names}" if len(members) == 1 else f"started a pack: {names}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for member, values in member_results(result):
            if "diverged" in values and (trial.trial_id, member) in self.running:
                self._failed(trial, member, f"TrainingDiverged: {values['diverged']}", False)
            if "checkpoint_damage" in values:
                self._print(f"{_name(trial, member)}: {values['checkpoint_damage']}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        for member, values in member_results(last):
            if (trial.trial_id, member) not in self.running:
                continue
            if "diverged" in values:
                self._failed(trial, member, f"TrainingDiverged: {values['diverged']}", False)
                continue
            self.running.discard((trial.trial_id, member))
            self.done += 1
            value = values.get("best_val_accuracy")
            if value is not None and (self.best is None or value > self.best[0]):
                self.best = (value, _name(trial, member))
            stopped = "" if last.get("completed") else " (stopped early)"
            self._print(f"finished {_name(trial, member)}{stopped}")

    def on_trial_error(self, iteration, trials, trial, **info):
        for member in members_of(trial.config):
            if (trial.trial_id, member) in self.running:
                self._failed(trial, member, error_text(trial))

    def _failed(self, trial, member, text: str, raised: bool = True) -> None:
        """One line; for an error Ray raised, where its traceback went (a pack member's
        divergence is a result, without one)."""
        self.running.discard((trial.trial_id, member))
        self.failed += 1
        where = f" (traceback in {self.log})" if self.log and raised else ""
        self._print(f"failed {_name(trial, member)}: {text}{where}")


def _name(trial, member=None) -> str:
    if member is not None:
        spec = member_specs(trial.config)[member]
        rep = spec["config"].get("repetition", 0)
        drawing = f" repetition {rep}" if rep else ""
        return f"{spec['cell']} seed {spec['seed']}{drawing} fold {spec['fold']}"
    return tuned_name(trial)


def tuned_name(trial) -> str:
    """A tuning trial's name, its MLflow run's: Tune numbers a study's trials in creation order,
    and its experiment tag starts with that number."""
    number = str(trial.experiment_tag).split("_", 1)[0]
    return f"tuned-{int(number):03d}" if number.isdigit() else f"tuned-{trial.trial_id}"


def sampled_text(config: dict) -> str:
    """A tuning trial's sampled values, short: numbers to 3 significant digits."""

    def short(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={short(v)}" for k, v in sorted(config.items()))


class GracefulStop(Callback):
    def __init__(self, session: str, session_uri: str):
        self.session, self.session_uri = session, session_uri
        self._reset()

    def _reset(self) -> None:
        self.running: set[str] = set()
        self.waiting: set[str] | None = None
        self.tune_handler = None
        self.stopped = False
        self.timer: threading.Timer | None = None

    def __getstate__(self):
        return {"session": self.session, "session_uri": self.session_uri}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def setup(self, **info):
        self._reset()
        if threading.current_thread() is threading.main_thread():
            self.tune_handler = signal.getsignal(signal.SIGINT)  # Tune's, installed by now
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.waiting is not None:  # a second signal
            if signum == signal.SIGINT:
                self._stop()
            return
        INTERRUPTED[self.session] = signum
        Storage(self.session_uri).write_text(FLAG, "1")
        self.waiting = set(self.running)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        bound = (
            " (Ctrl-C again to stop now)"
            if signum == signal.SIGINT
            else f" (at most {TERM_GRACE:.0f} s)"
        )
        print(
            f"\n{name}: no further trial starts; waiting for {len(self.waiting)} running "
            f"trial(s) to checkpoint at the end of their epoch{bound}",
            file=sys.stderr,
            flush=True,
        )
        if signum != signal.SIGINT:
            self.timer = threading.Timer(TERM_GRACE, self._stop_from_timer)
            self.timer.daemon = True
            self.timer.start()
        if not self.waiting:
            self._stop()

    def _stop_from_timer(self) -> None:
        # the handler must run in the main thread: send ourselves the signal Tune handles
        if not self.stopped:
            self.waiting = set()
            signal.raise_signal(signal.SIGINT)

    def _settled(self, trial) -> None:
        if self.waiting is not None:
            self.waiting.discard(trial.trial_id)
            if not self.waiting:
                self._stop()

    def _stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
        if callable(self.tune_handler):
            self.tune_handler(signal.SIGINT, None)  # Tune saves its state and returns
        else:
            raise Interrupted(INTERRUPTED.get(self.session, signal.SIGINT))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        if self.waiting is not None and not self.stopped:
            # Tune launched it before the signal: it checkpoints at the end of its first epoch,
            # and the study waits for that (else an epoch it reported would be lost)
            self.waiting.add(trial.trial_id)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._settled(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._settled(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._settled(trial)


class JournalMirror(Callback):
    """Copies the local Optuna journal into an object-store session after every trial."""

    def __init__(self, storage, session: str):
        self.storage, self.session = storage, session

    def _copy(self) -> None:
        path = LOCAL_JOURNALS / f"{self.session}.journal"
        if path.exists():
            self.storage.write_text(f"{self.session}/{JOURNAL}", path.read_text())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._copy()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._copy()

    def on_experiment_end(self, trials, **info):
        self._copy()
