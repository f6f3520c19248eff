"""Ctrl-C during a study: checkpoint first, then stop.

Tune's own handler stops the experiment at once, and running trials lose the epochs since their
last checkpoint, which with adaptive checkpointing can be many. Here the first Ctrl-C stops
scheduling (no further trial starts), asks every running trial to write a checkpoint at the end
of its current epoch (a flag in Ray's GCS that the trainable reads once an epoch), and hands
over to Tune's own handler once each has checkpointed or ended; Tune then saves its state and
returns. A second Ctrl-C hands over at once.
"""

from __future__ import annotations

import signal
import sys
import threading

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

INTERRUPTED: set[str] = set()  # sessions of this driver whose first Ctrl-C came


def _key(session: str) -> str:
    return f"fer-ablation:checkpoint-now:{session}"


def checkpoint_requested(session: str) -> bool:
    """In a trial: whether the driver asked for a checkpoint now."""
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(_key(session)) is not None


def clear(session: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_initialized

    INTERRUPTED.discard(session)
    if _internal_kv_initialized():
        _internal_kv_del(_key(session))


class _Pausable:
    """A scheduler that starts no trial once its session was interrupted."""

    session = ""

    def choose_trial_to_run(self, tune_controller):
        if self.session in INTERRUPTED:
            return None
        return super().choose_trial_to_run(tune_controller)


class PausableFIFO(_Pausable, FIFOScheduler):
    def __init__(self, session: str):
        super().__init__()
        self.session = session


class PausableASHA(_Pausable, ASHAScheduler):
    def __init__(self, session: str, **asha):
        super().__init__(**asha)
        self.session = session


class GracefulStop(Callback):
    def __init__(self, session: str):
        self.session = session
        self._reset()

    def _reset(self) -> None:
        self.running: set[str] = set()
        self.waiting: set[str] | None = None
        self.tune_handler = None
        self.stopped = False

    def __getstate__(self):
        return {"session": self.session}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def setup(self, **info):
        self._reset()
        if threading.current_thread() is threading.main_thread():
            self.tune_handler = signal.getsignal(signal.SIGINT)  # Tune's, installed by now
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, sig, frame):
        if self.waiting is not None:  # the second Ctrl-C
            self._stop()
            return
        from ray.experimental.internal_kv import _internal_kv_put

        INTERRUPTED.add(self.session)
        _internal_kv_put(_key(self.session), b"1")
        self.waiting = set(self.running)
        print(f"\nCtrl-C: no further trial starts; waiting for {len(self.waiting)} running "
              "trial(s) to checkpoint at the end of their epoch (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)  # fmt: skip
        if not self.waiting:
            self._stop()

    def _settled(self, trial) -> None:
        if self.waiting is not None:
            self.waiting.discard(trial.trial_id)
            if not self.waiting:
                self._stop()

    def _stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if callable(self.tune_handler):
            self.tune_handler(signal.SIGINT, None)  # Tune saves its state and returns
        else:
            raise KeyboardInterrupt

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._settled(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._settled(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._settled(trial)
