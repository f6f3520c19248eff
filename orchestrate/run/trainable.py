"""The Ray Tune trainables: a tuning sample is one Tune trial (``run_trial``); a grid study's
Tune trial is a pack of one or more of its trials (``run_pack``, ``fermodel.engine.fit_pack``),
each reported under its index in the pack. Data comes from Ray's object store. And the task
``--pack auto`` runs on a GPU node to measure pack sizes (``measure_size``).

Per epoch it reports the engine's metrics with a checkpoint; at the end one more result holds
the test figures (``completed: 1``) and a checkpoint folder of artifacts: predictions (for
paired statistics), the per-class report, the confusion matrix and curves, and the selected
model's weights. A restarted trial continues from its last checkpoint; one restarted after its
final result simply reports it again.

A diverging trial raises ``TrialDiverged``: Tune marks it ERROR and tells the searcher and the
scheduler it failed (no metric is invented for it). Tune retries failed trials (lost nodes
need that); a divergence is deterministic, so the first attempt leaves a note in the study's
storage and a retry that finds it fails again at once instead of training to the same NaN.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from fermodel.checkpoint import STATE_FILE
from fermodel.config import TrialConfig
from fermodel.engine import TrainingDiverged, data_key, fit
from orchestrate.plan.packing import SIZES, WITHIN, best_size, member_specs
from orchestrate.run.interrupt import StopRequest
from orchestrate.store.storage import Storage

RESULTS_FILE = "results.json"
BEST_MODEL_FILE = "best_model.pt"  # the selected weights (the driver logs them as an MLflow model)
FAILURES = "failures"  # folder of the session's storage: one note per diverged trial


class TrialDiverged(RuntimeError):
    """The trial's loss became NaN or inf (one message argument, so it pickles across Ray)."""


def trial_config(params: dict, base: dict, index: int | None = None) -> tuple[TrialConfig, dict]:
    """The full config of a trial and its place in the study (cell, seed, fold, repetition):
    the pack member ``index`` of a grid's Tune trial, or a tuning sample."""
    if index is not None:  # a grid cell
        spec = member_specs(params)[index]
        config = TrialConfig.from_dict(spec["config"])
        return config, {
            "cell": spec["cell"],
            "seed": spec["seed"],
            "fold": spec["fold"],
            "repetition": config.repetition,
        }
    values = {**base, **params}  # a tuning sample on top of the study's base config
    config = TrialConfig.from_dict(values)
    return config, {"cell": "tuned", "seed": config.seed, "fold": config.fold, "repetition": 0}


def final_metrics(result, seconds: float) -> dict:
    """The trial's last result: test figures, selection, cost (``trial_seconds`` is the wall
    time of this attempt inside the trial, from data to artifacts) and its notes."""
    out = {f"test_{k}": v for k, v in result.test.items()}
    full = result.test_full or {}
    out.update({f"test_full_{k}": full[k] for k in ("accuracy", "macro_f1") if k in full})
    out.update({f"{part}_images": n for part, n in result.split_sizes.items()})
    out.update(
        trial_seconds=seconds,
        best_epoch=result.best_epoch,
        best_val_accuracy=result.val.get("accuracy", float("nan")),
        train_seconds=result.train_seconds,
        mean_images_per_second=result.images_per_second,
        checkpoints=len(result.checkpoint_epochs),  # written by this attempt
        checkpoint_seconds=result.checkpoint_seconds,
        **result.cost,  # params, GFLOPs, latency and throughput, peak memory (fermodel.cost)
        epoch=len(result.history),
        completed=1,
        notes=" | ".join(result.notes),  # how it ran: data, graphs, packing, resumption
    )
    return out


def write_artifacts(folder: Path, final: dict, result) -> None:
    from fermodel.plots import plot_trial  # matplotlib: imported by the actors that finish

    (folder / RESULTS_FILE).write_text(json.dumps(final) + "\n")
    (folder / "predictions.json").write_text(
        json.dumps(
            {
                "classes": list(result.classes),
                "ids": result.test_ids,
                "groups": result.test_groups,
                "labels": result.test_labels,
                "predictions": result.test_predictions,
            }
        )
        + "\n"
    )
    report = {
        "classes": list(result.classes),
        "test": result.test,
        "val": result.val,
        "confusion": result.test_confusion,
        "best_epoch": result.best_epoch,
        "notes": result.notes,
    }
    (folder / "per_class_report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_trial(result, folder)
    if result.model_state is not None:
        torch.save(result.model_state, folder / BEST_MODEL_FILE)


def memory_fraction(gpus: float) -> float | None:
    """The share of its GPU's memory a trial asking for ``gpus`` of one may allocate: Ray's
    fractional GPUs are logical, so trials sharing a device are bounded here (None: whole)."""
    return gpus if 0 < gpus < 1 else None


def prepare_worker(cpus: float, gpus: float) -> None:
    """A trial's process (or the pack-size measurement's): torch threads as its CPUs, and its
    GPU memory held to its share of the device."""
    torch.set_num_threads(max(1, int(cpus)))
    share = memory_fraction(gpus)
    if share is not None and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(share)


def run_trial(
    params: dict,
    datasets: dict,
    base: dict,
    cpus: float = 1.0,
    gpus: float = 0.0,
    session_uri: str | None = None,
    storage_uri: str | None = None,
) -> None:
    """A tuning sample: one trial, reported flat (its scheduler and searcher read the metrics)."""
    started = time.perf_counter()
    prepare_worker(cpus, gpus)
    session = Storage(session_uri) if session_uri else None
    note = f"{FAILURES}/{tune.get_context().get_trial_id()}.txt"
    if session and (earlier := session.read_text(note)) is not None:  # a diverged trial's retry
        raise TrialDiverged(earlier)
    config, _ = trial_config(params, base)
    data = datasets[data_key(config)]
    previous = tune.get_checkpoint()
    damaged = None
    with tempfile.TemporaryDirectory(prefix="fer-resume-") as restored:
        start = None
        if previous is not None:
            previous.to_directory(restored)
            if (Path(restored) / RESULTS_FILE).is_file():  # finished before: report it again
                final = json.loads((Path(restored) / RESULTS_FILE).read_text())
                tune.report(final, checkpoint=tune.Checkpoint.from_directory(restored))
                return
            start = Path(restored) / STATE_FILE
            if (why := _damaged(Path(restored))) is not None:  # Tune keeps no older one to try
                start, damaged = None, _damage_note([f"{previous.path}: {why}"], 0)

        asked = StopRequest(session) if session else None

        def report(metrics: dict, folder: str | None) -> None:
            checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
            tune.report(metrics, checkpoint=checkpoint)
            if checkpoint and asked:
                asked.pause_after_checkpoint()

        try:
            result = fit(config, data, report=report, checkpoint=start, checkpoint_now=asked)
        except TrainingDiverged as err:
            if session:
                session.write_text(note, str(err))
            raise TrialDiverged(str(err)) from None
        if damaged:
            result.notes.insert(0, damaged)

    with tempfile.TemporaryDirectory(prefix="fer-final-") as folder:
        final = final_metrics(result, time.perf_counter() - started)
        final["node_id"] = ray.get_runtime_context().get_node_id()
        write_artifacts(Path(folder), final, result)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(folder))


def run_pack(
    params: dict,
    datasets: dict,
    base: dict,
    cpus: float = 1.0,
    gpus: float = 0.0,
    session_uri: str | None = None,
    storage_uri: str | None = None,
) -> None:
    """A grid's Tune trial: its member trials trained as one pack. Each epoch reports
    ``{"epoch": e, "members": {index: metrics | {"diverged": message}}}`` with a checkpoint
    folder holding one subfolder per live member (a single trial's checkpoint); the last report
    has ``completed: 1`` and each member's test figures, its artifacts in its subfolder. A
    member that diverged leaves a note in the session's storage, so that a retry of the pack
    (a lost node) does not train it again; members that had finished report again."""
    started = time.perf_counter()
    prepare_worker(cpus, gpus)
    session = Storage(session_uri) if session_uri else None
    specs = member_specs(params)
    configs = [TrialConfig.from_dict(s["config"]) for s in specs]
    trial_id = tune.get_context().get_trial_id()
    notes = {i: f"{FAILURES}/{trial_id}-{i}.txt" for i in range(len(specs))}
    ended = {
        i: text
        for i, note in notes.items()
        if session and (text := session.read_text(note)) is not None
    }
    with tempfile.TemporaryDirectory(prefix="fer-resume-") as restored:
        sources, damage = _member_sources(specs, restored, storage_uri)
        finals = {i: src for i, src in sources.items() if (src / RESULTS_FILE).is_file()}
        live = [i for i in range(len(specs)) if i not in finals and i not in ended]
        results = {}
        if live:
            results = _train_members(live, configs, datasets, sources, session, notes, damage)
        _report_final(results, finals, ended, started)


def _report_final(results: dict, finals: dict, ended: dict, started: float) -> None:
    """The pack's last report: each member's test figures and artifacts in its subfolder (a
    member that had finished before this attempt: its earlier figures and files, again)."""
    with tempfile.TemporaryDirectory(prefix="fer-final-") as folder:
        members = {str(i): {"diverged": text} for i, text in ended.items()}
        for i, result in results.items():
            if isinstance(result, TrainingDiverged):
                members[str(i)] = {"diverged": str(result)}
                continue
            final = final_metrics(result, time.perf_counter() - started)
            final["node_id"] = ray.get_runtime_context().get_node_id()
            (Path(folder) / str(i)).mkdir()
            write_artifacts(Path(folder) / str(i), final, result)
            members[str(i)] = final
        for i, source in finals.items():
            shutil.copytree(source, Path(folder) / str(i))
            members[str(i)] = json.loads((source / RESULTS_FILE).read_text())
        epoch = max((m.get("epoch", 0) for m in members.values()), default=0)
        tune.report(
            {"epoch": epoch, "completed": 1, "members": members},
            checkpoint=tune.Checkpoint.from_directory(folder),
        )


def _member_sources(specs: list[dict], folder: str, storage_uri: str | None) -> tuple[dict, dict]:
    """Each member's intact checkpoint folder, copied into ``folder``: this Tune trial's own
    (a retried pack), else the newest intact one an earlier invocation indexed for it
    (``orchestrate.plan.ledger``); and, for members whose checkpoints were found damaged, what was
    damaged and the epoch they continue after instead (0: from scratch). A damaged checkpoint
    is dropped from the index, so no later invocation tries it again."""
    from orchestrate.plan.ledger import forget

    sources, damaged, after = {}, {}, {}
    own = tune.get_checkpoint()
    if own is not None:
        own.to_directory(folder)
        for member in (p for p in Path(folder).iterdir() if p.name.isdigit()):
            if (why := _damaged(member)) is None:
                sources[int(member.name)] = member
            else:
                damaged[int(member.name)] = [f"{own.path}/{member.name}: {why}"]
    storage = Storage(storage_uri) if storage_uri else None
    for i, spec in enumerate(specs):
        if i in sources or storage is None:
            continue
        filesystem, _ = storage.filesystem()
        for n, (path, epoch) in enumerate(_indexed(spec)):
            target = Path(folder) / f"earlier-{i}-{n}"
            try:
                tune.Checkpoint(path, filesystem=filesystem).to_directory(str(target))
                why = _damaged(target)
            except OSError as err:  # deleted since the plan, or unreadable
                why = f"cannot be read ({err})"
            if why is None:
                sources[i], after[i] = target, epoch
                break
            damaged.setdefault(i, []).append(f"{path} (epoch {epoch}): {why}")
            forget(storage, spec["identity"], path)
    return sources, {i: (texts, after.get(i, 0)) for i, texts in damaged.items()}


def _indexed(spec: dict) -> list[tuple[str, int]]:
    """The checkpoints the plan found for a grid trial, newest first."""
    if not spec.get("resume_from"):
        return []
    newest = (spec["resume_from"], (spec.get("continues") or {}).get("epoch", 0))
    return [newest, *(tuple(entry) for entry in spec.get("older", []))]


def _damaged(folder: Path) -> str | None:
    """Why a member's checkpoint folder cannot be continued from, or None (finished members'
    folders hold their results instead)."""
    from fermodel.checkpoint import CheckpointError, load_checkpoint

    if (folder / RESULTS_FILE).is_file():
        return None
    try:
        load_checkpoint(folder)
    except CheckpointError as err:
        return str(err).split(": ", 1)[-1]
    return None


def _train_members(
    live: list[int], configs, datasets, sources, session, notes, damage: dict
) -> dict:
    """``fit_pack`` on the live members, reporting each epoch under their pack indices. A
    member whose checkpoints were damaged says so in its first report and in its notes."""
    from fermodel.engine import fit_pack

    data = datasets[data_key(configs[live[0]])]
    starts = [sources[i] / STATE_FILE if i in sources else None for i in live]
    asked = StopRequest(session) if session else None
    said = {i: _damage_note(*damage[i]) for i in live if i in damage}
    unsaid = dict(said)

    def report(metrics: list, folder: str | None) -> None:
        members = {}
        for i, entry in zip(live, metrics, strict=True):
            if isinstance(entry, TrainingDiverged):
                if session:
                    session.write_text(notes[i], str(entry))
                members[str(i)] = {"diverged": str(entry)}
            elif entry is not None:
                members[str(i)] = entry
                if i in unsaid:
                    members[str(i)] = {
                        **entry,
                        "checkpoint_damage": unsaid.pop(i),
                        "continued_after_epoch": damage[i][1],
                    }
        epoch = next((m["epoch"] for m in members.values() if "epoch" in m), 0)
        if folder is None:
            tune.report({"epoch": epoch, "members": members})
            return
        # fit_pack names its checkpoints by position among the live members: rename them by
        # the pack's own indices, which the driver and a retry read
        with tempfile.TemporaryDirectory(prefix="fer-pack-") as named:
            for position, i in enumerate(live):
                if (Path(folder) / str(position)).is_dir():
                    (Path(folder) / str(position)).rename(Path(named) / str(i))
            tune.report(
                {"epoch": epoch, "members": members},
                checkpoint=tune.Checkpoint.from_directory(named),
            )
        if asked:
            asked.pause_after_checkpoint()

    out = fit_pack(
        [configs[i] for i in live], data, report=report, checkpoints=starts, checkpoint_now=asked
    )
    for i, result in zip(live, out, strict=True):
        if i in said and not isinstance(result, TrainingDiverged):
            result.notes.insert(0, said[i])
    return dict(zip(live, out, strict=True))


def _damage_note(damaged: list[str], epoch: int) -> str:
    went = f"continued after epoch {epoch}" if epoch else "started over (no intact checkpoint)"
    return f"damaged checkpoint(s) skipped: {'; '.join(damaged)}; {went}"


def measure_size(config_values: dict, data, gpus: float, limit: int) -> tuple[int, dict]:
    """On a GPU node (a Ray task asking for the trials' GPUs): images/s of packs of the
    ``SIZES`` up to ``limit`` members, stopping at the first that does not fit, fails its
    check on the device (``fermodel.pack.checked_pack``) or gains less than ``WITHIN``;
    returns the size to use and what was measured (``orchestrate.plan.packing`` says why)."""

    @ray.remote(num_gpus=gpus, num_cpus=1)
    def measure(values: dict, dataset) -> dict:
        from fermodel.speed import pack_throughput

        prepare_worker(1, gpus)  # held to the trials' share of the device: a pack must fit it
        config = TrialConfig.from_dict(values)
        measured: dict[int, float] = {}
        for k in (s for s in SIZES if s <= max(limit, 1)):
            try:
                rate, _, packed = pack_throughput(config, dataset, k)
            except MemoryError:
                break
            if not packed:  # failed its check on this device: larger packs would too
                break
            measured[k] = rate
            previous = [v for size, v in measured.items() if size < k]
            if previous and measured[k] < (1 + WITHIN) * max(previous):
                break
        return measured

    measured = ray.get(measure.remote(config_values, data))
    return best_size(measured), measured
