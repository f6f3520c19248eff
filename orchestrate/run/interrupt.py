"""Stopping a study: SIGINT (Ctrl-C) and SIGTERM checkpoint first, then stop.

Tune's own handler stops the experiment at once, and running trials lose the epochs since their
last checkpoint, which with adaptive checkpointing can be many. Here the first SIGINT or SIGTERM
stops scheduling (no further trial starts), asks every running trial to write a checkpoint at
the end of its current epoch (a flag file in the session's storage that the trainable reads once
an epoch; any node sees it, as it sees its checkpoints; a trial trains no further epoch after
that checkpoint), and hands over to Tune's own handler
once each has checkpointed or ended; Tune then saves its state and returns. A second SIGINT
hands over at once; after SIGTERM (what Kubernetes, Slurm, ``docker stop`` and systemd send)
the wait is bounded by ``TERM_GRACE`` seconds, within the 30 s Kubernetes grants by default.
The runner then marks the open runs KILLED and the command exits 130 (SIGINT) or 143 (SIGTERM);
the next invocation continues the unfinished trials from their checkpoints.

The signal handlers are Python's, installed in the driver's main thread after Ray started, so
they replace the C-level handler Ray's core worker installs (which prints a stack dump).
"""

from __future__ import annotations

import signal
import time

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from orchestrate.run.mo_asha import ParetoASHA
from orchestrate.store.storage import Storage

FLAG = "checkpoint-now"  # file in the session's storage: running trials checkpoint at once
TERM_GRACE = 25.0  # seconds SIGTERM waits for running trials to checkpoint
INTERRUPTED: dict[str, int] = {}  # session -> the signal that stopped it (this driver)


class Interrupted(KeyboardInterrupt):
    """The study was stopped by a signal; ``exit_code`` is 128 + its number."""

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message or signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def checkpoint_requested(session: Storage) -> bool:
    """In a trial: whether the driver asked for a checkpoint now."""
    return session.read_text(FLAG) is not None


class StopRequest:
    """In a trial: the engine's ``checkpoint_now`` (whether the driver asked for a checkpoint,
    read once an epoch), and the pause after that checkpoint is reported. A trial that trained
    on would report epochs past the checkpoint the driver waits for; Tune processes a result
    and its checkpoint as two events, so the stop could fall between them and lose an epoch the
    run already shows. Tune ends the paused trial when it stops (within 5 s)."""

    def __init__(self, session: Storage):
        self.session, self.asked = session, False

    def __call__(self) -> bool:
        self.asked = self.asked or checkpoint_requested(self.session)
        return self.asked

    def pause_after_checkpoint(self) -> None:
        while self.asked:
            time.sleep(60)


def clear(session_uri: str) -> None:
    """Forget an earlier interruption of this session (a resumed tuning session)."""
    storage = Storage(session_uri)
    INTERRUPTED.pop(storage.uri.rstrip("/").rsplit("/", 1)[-1], None)
    filesystem, path = Storage(storage.join(FLAG)).filesystem()
    try:
        filesystem.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


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


class PausableParetoASHA(_Pausable, ParetoASHA):
    def __init__(self, session: str, **asha):
        super().__init__(**asha)
        self.session = session


def on_sigterm_before_tune(signum, frame):
    """SIGTERM while the study prepares (data, MLflow, Ray): stop with 143, nothing to save."""
    raise Interrupted(signal.SIGTERM)
