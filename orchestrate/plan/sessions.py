"""A study's sessions in its storage: what each planned, whether it finished, which to resume.

A session is one Tune experiment folder, ``<storage>/<study>__<dataset>__<preset>__<start>``.
Beside Tune's own files it holds ``study-plan.json`` (written when the session starts: every
trial's config, or the base config and tuning settings) and, once the study's report is
written, ``study-finished.json``. ``--resume`` continues the newest session that has not
finished, and only if the command line still plans the same trials: a changed ``--epochs``,
``--seeds``, ``--num-samples`` or study file is refused with what changed, since Tune would
silently keep the old plan.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from orchestrate.store.storage import Storage

SEP = "__"
PLAN_FILE = "study-plan.json"
FINISHED_FILE = "study-finished.json"


def prefix(plan) -> str:
    return SEP.join([plan.study.name, plan.study.dataset, str(plan.preset)]) + SEP


def new_session(plan) -> str:
    return prefix(plan) + time.strftime("%Y%m%d-%H%M%S")


def plan_record(plan) -> dict:
    """What the session's trials are; ``device`` is left out, since where they run (the GPUs
    per trial, the cluster) may change between invocations without changing the trials."""
    study = plan.study

    def science(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "device"}

    record = {
        "study": study.name,
        "kind": study.kind,
        "dataset": study.dataset,
        "data_path": study.data_path,
        "preset": plan.preset,
        "seeds": study.seeds_for(plan.preset),
        "folds": study.folds,
        "base": science(plan.base),
    }
    if study.kind == "grid":
        record["trials"] = {s.key: science(s.config.to_dict()) for s in plan.trials}
    else:
        record["tune"] = asdict(plan.tune)
    return json.loads(json.dumps(record, default=str))  # what a JSON round trip keeps


def write_plan(storage: Storage, session: str, plan) -> None:
    storage.write_text(f"{session}/{PLAN_FILE}", json.dumps(plan_record(plan), indent=1))


def mark_finished(storage: Storage, session: str, summary: dict) -> None:
    storage.write_text(f"{session}/{FINISHED_FILE}", json.dumps(summary, indent=1))


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two plan records, one readable item per change."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "trials":
            a, b = a or {}, b or {}
            if added := sorted(set(b) - set(a)):
                out.append(
                    f"{len(added)} trial(s) added ({', '.join(added[:3])}"
                    f"{', ...' if len(added) > 3 else ''})"
                )
            if removed := sorted(set(a) - set(b)):
                out.append(
                    f"{len(removed)} trial(s) removed ({', '.join(removed[:3])}"
                    f"{', ...' if len(removed) > 3 else ''})"
                )
            differing = {
                (k, str(a[t].get(k)), str(b[t].get(k)))
                for t in set(a) & set(b)
                for k in set(a[t]) | set(b[t])
                if a[t].get(k) != b[t].get(k)
            }
            out += [f"{k}: {x} -> {y}" for k, x, y in sorted(differing)]
        elif isinstance(a, dict) and isinstance(b, dict):
            if key == "base" and "trials" in new:
                continue  # a grid's base config shows in its trials' configs
            out += [
                f"{key}.{k}: {a.get(k)} -> {b.get(k)}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            out.append(f"{key}: {a} -> {b}")
    return out


def resumable(plan, storage: Storage) -> str:
    """The session ``--resume`` continues, or a FileNotFoundError/ValueError saying why none."""
    from ray.tune import Tuner

    candidates = [s for s in storage.sessions(prefix(plan)) if Tuner.can_restore(storage.join(s))]
    unfinished = [s for s in candidates if storage.read_text(f"{s}/{FINISHED_FILE}") is None]
    where = f"{prefix(plan).rstrip('_')} in {storage.uri}"
    if not unfinished:
        if candidates:
            raise FileNotFoundError(
                f"--resume: every session of {where} has finished (the newest is "
                f"{candidates[-1]}); run without --resume"
            )
        raise FileNotFoundError(f"--resume: no interrupted session of {where}")
    session = unfinished[-1]
    earlier = storage.read_text(f"{session}/{PLAN_FILE}")
    if earlier is not None:
        changed = changes(json.loads(earlier), plan_record(plan))
        if changed:
            raise ValueError(
                f"--resume: {session} planned other trials; changed: "
                f"{'; '.join(changed)}. Resume with the same study file and "
                "flags, or start a new session without --resume"
            )
    return session
