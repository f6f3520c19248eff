"""Compact progress of a study: trials done, running, failed, and the best so far on validation
(the selection metric; a study never picks by test, so its progress does not show test)."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback


class Progress(Callback):
    """One line per trial event. On ``--resume`` Tune restores this callback and the count
    starts from the trials finished by earlier invocations (read from MLflow)."""

    def __init__(self, planned: int, session: str, out=None):
        self.planned, self.session, self.out = planned, session, out
        self.started = time.monotonic()
        self.running: set[str] = set()
        self.done = self.failed = 0
        self.best: tuple[float, str] | None = None

    def __getstate__(self):
        return {**self.__dict__, "out": None}

    def setup(self, **info):
        self.out = self.out or sys.stdout
        self.started = time.monotonic()
        self.running = set()
        self.done = self.failed = 0
        self.earlier = None  # finished before this invocation: known once MLflow is open

    def _line(self, event: str) -> None:
        if self.earlier is None:
            from orchestrate.tracking import OPENING

            self.earlier = OPENING[self.session].result()[2]
            self.done += self.earlier
        self._print(event)

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
        self.running.add(trial.trial_id)
        self._line(f"started {_name(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        last = trial.last_result or {}
        self.done += 1
        value = last.get("best_val_accuracy")
        if value is not None and (self.best is None or value > self.best[0]):
            self.best = (value, _name(trial))
        stopped = "" if last.get("completed") else " (stopped early)"
        self._line(f"finished {_name(trial)}{stopped}")

    def on_trial_error(self, iteration, trials, trial, **info):
        from orchestrate.tracking import _error_text

        self.running.discard(trial.trial_id)
        self.failed += 1
        self._line(f"failed {_name(trial)}: {_error_text(trial)}")


def _name(trial) -> str:
    spec = trial.config.get("spec")
    if spec:
        return f"{spec['cell']} seed {spec['seed']} fold {spec['fold']}"
    return trial.trial_id
