"""A full ``--storage`` is one clear stop, not a crash.

When a trial cannot write its checkpoint (its error says "No space left on device"), or the
driver cannot write Tune's state or the checkpoint index, every further trial would fail the
same way, and Tune itself then dies reading the error files it could not write. So the first
such error stops the study (``FullStorageStop``, a Tune stopper the ``FullStorageWatch`` callback
arms), and the runner turns it into ``StorageFull``: its runs closed, what it can of the report
written, one line saying which storage is full and what to do, exit code 4. Nothing half-written
stays in the way of the next invocation: a checkpoint cut short is found damaged and skipped
(``orchestrate.run.trainable``), so after space is freed the same command continues every trial.
"""

from __future__ import annotations

import re

from ray.tune import Callback, Stopper

FULL: dict[str, str] = {}  # session -> the error that said its storage is full
_NO_SPACE = re.compile(r"No space left on device|\[Errno 28\]|errno 28\b|ENOSPC")


class StorageFull(RuntimeError):
    """The study's storage has no space left."""

    @classmethod
    def of(cls, storage_uri: str, detail: str) -> StorageFull:
        return cls(
            f"--storage {storage_uri} is full ({_detail(detail)}): the study stopped, its "
            "runs are closed and its trials keep their last intact checkpoints. Free "
            "space there and run the same command: it continues them"
        )


def no_space(error: BaseException | str | None) -> bool:
    """Whether an error (or its text, or one it was raised from) says the disk is full."""
    seen = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == 28 or _NO_SPACE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return isinstance(error, str) and bool(_NO_SPACE.search(error))


def _detail(text: str) -> str:
    found = _NO_SPACE.search(text)
    return "No space left on device" if found else text.splitlines()[0][:200]


class FullStorageWatch(Callback):
    """Arms the stop when a trial failed for want of space."""

    def __init__(self, session: str):
        self.session = session

    def on_trial_error(self, iteration, trials, trial, **info):
        from orchestrate.run.callbacks import error_text

        text = error_text(trial)
        if no_space(text):
            FULL.setdefault(self.session, text)

    on_trial_recover = on_trial_error  # before Tune retries it into the same full disk


class FullStorageStop(Stopper):
    """Stops every trial once the watch has seen the storage full."""

    def __init__(self, session: str):
        self.session = session

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.session in FULL
