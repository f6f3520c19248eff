"""Which trials of a grid study still have to run: the study's MLflow experiment is its ledger.

A trial is its identity (``search_spaces.study.trial_identity``: the study and the trial's
config without where it runs); every child run is tagged with it. An invocation runs only the
identities that have no FINISHED run in the experiment, whichever invocation ran it before:

- ``finished``: a FINISHED run exists; nothing runs (the report takes its newest).
- ``continue``: unfinished (killed, interrupted, lost, failed) with a checkpoint in the
  storage's index (``checkpoints/<identity>.json``, written by ``CheckpointIndex`` whenever
  Tune persists one); it resumes from there and redoes at most the epochs since. The index
  keeps the trial's ``INDEX_DEPTH`` newest checkpoints: one found damaged when the trial reads
  it is named in its notes and dropped from the index (``forget``), and the trial continues from
  the next older one that is intact, or from scratch.
- ``run``: never started, or unfinished without a checkpoint; it starts from scratch.
- ``diverged``: its newest run FAILED with a non-finite loss. Training is deterministic given
  its config, so it would diverge again: skipped unless ``--retry-failed``.

An invocation holds the study's lease (``orchestrate.plan.lease``), so a run still RUNNING when it
starts belongs to a driver that is gone (SIGKILL, a lost machine): it is closed as KILLED with a
``closed_by`` tag, and its trial continues.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrate.store.storage import Storage

IDENTITY_TAG = "trial_identity"
INDEX = "checkpoints"  # folder of the storage: one small JSON file per identity
INDEX_DEPTH = 3  # checkpoints an index entry remembers (Tune keeps two per trial)
ACTIONS = ("finished", "continue", "run", "diverged")


@dataclass(frozen=True)
class Fate:
    """What this invocation does with one trial of the plan, and why."""

    spec: object  # TrialSpec
    action: str  # one of ACTIONS
    reason: str
    checkpoint: str = ""  # the checkpoint to continue from (a path in the storage)
    run_id: str = ""  # the run that decided (the finished, diverged or continued one)
    epoch: int = 0  # the epoch of the checkpoint
    older: tuple = ()  # (path, epoch) of older checkpoints, newest first: if it is damaged

    @property
    def runs(self) -> bool:
        return self.action in ("continue", "run")


def index_path(identity: str) -> str:
    return f"{INDEX}/{identity}.json"


def indexed(storage: Storage, identity: str) -> list[dict]:
    """The identity's indexed checkpoints ({"path", "epoch", ...}), newest first."""
    text = storage.read_text(index_path(identity))
    if text is None:
        return []
    entry = json.loads(text)
    return entry.get("checkpoints", [entry] if "path" in entry else [])


def remember(storage: Storage, identity: str, entry: dict) -> None:
    """Index a checkpoint Tune persisted as the identity's newest."""
    older = [e for e in indexed(storage, identity) if e.get("path") != entry["path"]]
    entries = [entry, *older][:INDEX_DEPTH]
    storage.write_text(index_path(identity), json.dumps({"checkpoints": entries}))


def forget(storage: Storage, identity: str, path: str) -> None:
    """Drop a damaged checkpoint from the index: no invocation tries it again."""
    entries = [e for e in indexed(storage, identity) if e.get("path") != path]
    storage.write_text(index_path(identity), json.dumps({"checkpoints": entries}))


def checkpoints(storage: Storage, identity: str) -> list[tuple[str, int]]:
    """(path, epoch) of the identity's indexed checkpoints that still exist, newest first."""
    from pyarrow import fs

    filesystem, _ = storage.filesystem()
    return [
        (e["path"], int(e.get("epoch", 0)))
        for e in indexed(storage, identity)
        if e.get("path") and filesystem.get_file_info(e["path"]).type == fs.FileType.Directory
    ]


def identity_runs(tracker) -> dict[str, list]:
    """The experiment's child runs by identity, newest first."""
    from orchestrate.store.tracking import PARENT_TAG

    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.{PARENT_TAG} = 'false'",
        max_results=50_000,
        order_by=["attributes.start_time DESC"],
    )
    out: dict[str, list] = {}
    for run in runs:
        identity = run.data.tags.get(IDENTITY_TAG)
        if identity:
            out.setdefault(identity, []).append(run)
    return out


def plan_fates(specs, tracker, storage: Storage, retry_failed: bool = False) -> list[Fate]:
    """Every planned trial's fate (see the module docstring); reads MLflow and the storage,
    writes nothing."""
    by_identity = identity_runs(tracker)
    fates = []
    for spec in specs:
        runs = by_identity.get(spec.identity, [])
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished:
            fates.append(Fate(spec, "finished", "finished before", run_id=finished[0].info.run_id))
            continue
        newest = runs[0] if runs else None
        diverged = newest is not None and newest.data.tags.get("failure_reason") == "divergence"
        if diverged and not retry_failed:
            fates.append(
                Fate(
                    spec,
                    "diverged",
                    "diverged before (--retry-failed runs it again)",
                    run_id=newest.info.run_id,
                )
            )
            continue
        found = checkpoints(storage, spec.identity)
        checkpoint, epoch = found[0] if found else ("", 0)
        if newest is None:
            reason = "new"
        else:
            reason = {
                "RUNNING": "its driver was killed",
                "KILLED": "interrupted",
                "FAILED": f"failed ({newest.data.tags.get('failure_reason', 'error')})",
            }.get(newest.info.status, newest.info.status.lower())
        if checkpoint and newest is not None:
            fates.append(
                Fate(
                    spec,
                    "continue",
                    f"{reason}; continues after epoch {epoch}",
                    checkpoint,
                    newest.info.run_id,
                    epoch,
                    tuple(found[1:]),
                )
            )
        else:
            fates.append(Fate(spec, "run", reason))
    return fates


def close_stale(tracker, fates: list[Fate], session: str) -> int:
    """Close what a killed driver left RUNNING: the runs of trials this invocation runs again
    and the parent runs of earlier invocations (called before this one opens its own)."""
    from orchestrate.store.tracking import PARENT_TAG

    by_identity = identity_runs(tracker)
    stale = [
        run
        for fate in fates
        if fate.runs
        for run in by_identity.get(fate.spec.identity, [])
        if run.info.status == "RUNNING"
    ]
    stale += tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.{PARENT_TAG} = 'true' and attributes.status = 'RUNNING'",
    )
    for run in stale:
        tracker.client.set_tag(run.info.run_id, "closed_by", session)
        tracker.client.set_terminated(run.info.run_id, "KILLED")
    return len(stale)


def describe_fates(fates: list[Fate], only_notable: bool = False) -> str:
    """A count of each action, then one line per trial; with ``only_notable`` only for the
    trials that continue, were skipped as diverged or run again after a failure."""
    counts = {a: sum(f.action == a for f in fates) for a in ACTIONS}
    lines = [
        f"{counts['run']} to run, {counts['continue']} to continue, {counts['finished']} "
        f"finished before (skipped), {counts['diverged']} diverged before (skipped)"
    ]
    for fate in fates:
        if only_notable and (fate.action == "finished" or fate.reason == "new"):
            continue
        c = fate.spec.config
        lines.append(
            f"  {fate.spec.key:34s} {c.backbone}/{c.attention}/{c.loss:7s} "
            f"{fate.action:9s} {fate.reason}"
        )
    return "\n".join(lines)
