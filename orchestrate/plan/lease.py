"""One runner per study at a time: a lease in the study's storage.

An invocation claims its study after every check (the cluster's resources and the storage's
reach included) and before it writes anything or opens an MLflow run; a look before Ray starts
(``Lease.check``) refuses a second invocation of a running study at once. The lease is a small
file, ``<storage>/leases/<study>/<generation>.json``, naming its holder (host, pid, session,
parent run, since when) and renewed by a thread while the holder lives. A
generation is only ever created if absent (an exclusive create in a folder, a conditional put on
S3), so of two invocations started together exactly one gets it; the other refuses with one line
naming the holder (``LeaseHeld``: exit 2, nothing created). Refusing, not sharing the trials, is
the choice: a second copy of a running study is a mistake (a job submitted twice, a colleague
unaware), and one runner per study keeps the ledger's "RUNNING means running" true.

A lease that is not released (its holder was SIGKILLed, its machine lost) goes stale: at once
when its holder ran on this host and its process is gone, else when it has not been renewed for
its expiry (``FER_LEASE_SECONDS``, 300 by default; host clocks are assumed to agree to well
within it). The next invocation then creates the next generation and continues the study; only
then does it close the runs a dead driver left RUNNING (``orchestrate.plan.ledger.close_stale``).
Invocations of one study share its ``--storage`` (a shared folder or a bucket): that is where the
lease is looked for.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace

from orchestrate.store.storage import Storage

FOLDER = "leases"
EXPIRY_ENV = "FER_LEASE_SECONDS"
DEFAULT_EXPIRY = 300.0


class LeaseHeld(ValueError):
    """Another invocation is running this study."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    process_start: str  # the process's start time on its host ("" where /proc is absent)
    session: str
    since: float
    renewed: float
    expiry: float
    parent_run: str = ""
    released: bool = False

    def stale(self, now: float) -> str | None:
        """Why this lease no longer holds, or None while it does."""
        if self.released:
            return "released"
        if self.host == socket.gethostname() and not _alive(self.pid, self.process_start):
            return f"its process {self.pid} on this host is gone"
        if now > self.renewed + self.expiry:
            return f"not renewed since {_clock(self.renewed)}"
        return None

    def describe(self) -> str:
        parent = f", parent run {self.parent_run}" if self.parent_run else ""
        return (
            f"host {self.host}, pid {self.pid}, since {_clock(self.since)}, session "
            f"{self.session}{parent}"
        )


class Lease:
    """A lease this invocation holds: renewed in the background until ``release``."""

    def __init__(self, storage: Storage, study: str, generation: int, holder: Holder):
        self.storage, self.study, self.generation, self.holder = storage, study, generation, holder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @staticmethod
    def check(storage: Storage, study: str) -> None:
        """Raise ``LeaseHeld`` when the study is running now: a look, before the checks that
        take a while (Ray's start), so that a second invocation refuses at once."""
        _, current = _newest(storage, f"{FOLDER}/{study}")
        now = time.time()
        if current is not None and current.stale(now) is None:
            raise LeaseHeld(_refusal(study, storage, current, now))

    @classmethod
    def acquire(cls, storage: Storage, study: str, session: str, out=None) -> Lease:
        """Claim the study, or raise ``LeaseHeld`` saying who runs it and until when."""
        expiry = float(os.environ.get(EXPIRY_ENV) or DEFAULT_EXPIRY)
        folder = f"{FOLDER}/{study}"
        for _ in range(5):  # a lost race re-reads the winner's lease
            generation, current = _newest(storage, folder)
            now = time.time()
            if current is not None:
                why = current.stale(now)
                if why is None:
                    raise LeaseHeld(_refusal(study, storage, current, now))
                if why != "released":
                    print(
                        f"lease: taking over study {study} from {current.describe()} ({why})",
                        file=out or sys.stdout,
                    )
            me = Holder(
                socket.gethostname(),
                os.getpid(),
                _process_start(os.getpid()),
                session,
                now,
                now,
                expiry,
            )
            text = json.dumps(asdict(me), indent=1)
            if storage.create_text(f"{folder}/{generation + 1:06d}.json", text):
                lease = cls(storage, study, generation + 1, me)
                lease._prune(folder)
                lease._start()
                return lease
        raise LeaseHeld(
            f"study {study}: could not claim its lease in {storage.uri} "
            "(other invocations kept claiming it); try again"
        )

    @property
    def path(self) -> str:
        return f"{FOLDER}/{self.study}/{self.generation:06d}.json"

    def update(self, **changes) -> None:
        """Renew now, with ``changes`` (such as the parent run once it is open)."""
        with self._lock:
            self.holder = replace(self.holder, renewed=time.time(), **changes)
            self.storage.write_text(self.path, json.dumps(asdict(self.holder), indent=1))

    def release(self) -> None:
        """Stop renewing and mark the lease released, so the next invocation starts at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.update(released=True)
        except OSError as err:  # it expires by itself (a full storage has been said already)
            if err.errno != errno.ENOSPC:
                print(f"lease: could not release {self.path}: {err}", file=sys.stderr)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="study-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.holder.expiry / 5):
            try:
                self.update()
            except Exception as err:  # the storage may be back at the next renewal
                print(f"lease: renewing {self.path} failed: {err}", file=sys.stderr)

    def _prune(self, folder: str) -> None:
        """Older generations are history nobody reads again."""
        for name in self.storage.files(folder)[:-1]:
            if name.endswith(".json") and name < f"{self.generation:06d}.json":
                _delete(self.storage, f"{folder}/{name}")


def _newest(storage: Storage, folder: str) -> tuple[int, Holder | None]:
    names = [n for n in storage.files(folder) if n.endswith(".json") and n[:-5].isdigit()]
    if not names:
        return 0, None
    newest = max(names)
    text = storage.read_text(f"{folder}/{newest}")
    try:
        holder = Holder(**json.loads(text)) if text else None
    except (TypeError, ValueError):  # damaged: treated as released
        holder = None
    return int(newest[:-5]), holder


def _refusal(study: str, storage: Storage, holder: Holder, now: float) -> str:
    where = f"{storage.uri}/{FOLDER}/{study}"
    if holder.host == socket.gethostname():
        after = "stop it first, or wait for it to end"
    else:
        expires = holder.renewed + holder.expiry
        after = (
            f"if it is gone, its lease expires at {_clock(expires)} (in "
            f"{max(0, expires - now):.0f} s) and the same command continues the study then"
        )
    return f"study {study} is already running ({holder.describe()}; lease in {where}): {after}"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (Linux), or [] elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot, to tell a reused pid."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    fields = _stat(pid)
    if not fields:
        return True
    return fields[0] != "Z" and (not start or fields[19] == start)  # a zombie has ended


def _delete(storage: Storage, relative: str) -> None:
    filesystem, path = Storage(storage.join(relative)).filesystem()
    try:
        filesystem.delete_file(path)
    except OSError:
        pass
