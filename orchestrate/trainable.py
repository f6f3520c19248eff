"""The Ray Tune trainable: one trial = ``fermodel.engine.fit`` on data from the object store.

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
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from fermodel.checkpoint import STATE_FILE
from fermodel.config import TrialConfig
from fermodel.engine import TrainingDiverged, data_key, fit
from fermodel.plots import plot_trial
from orchestrate.interrupt import checkpoint_requested
from orchestrate.storage import Storage

RESULTS_FILE = "results.json"
BEST_MODEL_FILE = "best_model.pt"  # the selected weights (the driver logs them as an MLflow model)
FAILURES = "failures"  # folder of the session's storage: one note per diverged trial


class TrialDiverged(RuntimeError):
    """The trial's loss became NaN or inf (one message argument, so it pickles across Ray)."""


def trial_config(params: dict, base: dict) -> tuple[TrialConfig, dict]:
    """The full config of a trial and its place in the study (cell, seed, fold)."""
    if "spec" in params:  # a grid cell
        spec = params["spec"]
        return TrialConfig.from_dict(spec["config"]), {
            "cell": spec["cell"], "seed": spec["seed"], "fold": spec["fold"]
        }  # fmt: skip
    values = {**base, **params}  # a tuning sample on top of the study's base config
    config = TrialConfig.from_dict(values)
    return config, {"cell": "tuned", "seed": config.seed, "fold": config.fold}


def final_metrics(result, seconds: float) -> dict:
    """The trial's last result: test figures, selection, cost (``trial_seconds`` is the wall
    time of this attempt inside the trial, from data to artifacts)."""
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
        epoch=len(result.history),
        completed=1,
    )
    return out


def write_artifacts(folder: Path, final: dict, result) -> None:
    (folder / RESULTS_FILE).write_text(json.dumps(final) + "\n")
    (folder / "predictions.json").write_text(json.dumps({
        "classes": list(result.classes), "ids": result.test_ids, "groups": result.test_groups,
        "labels": result.test_labels, "predictions": result.test_predictions,
    }) + "\n")  # fmt: skip
    report = {"classes": list(result.classes), "test": result.test, "val": result.val,
              "confusion": result.test_confusion, "best_epoch": result.best_epoch,
              "notes": result.notes}  # fmt: skip
    (folder / "per_class_report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_trial(result, folder)
    if result.model_state is not None:
        torch.save(result.model_state, folder / BEST_MODEL_FILE)


def _earlier_checkpoint(params: dict, storage_uri: str | None):
    """The checkpoint an earlier invocation left for this trial (``orchestrate.ledger``), when
    it is still in the storage."""
    path = (params.get("spec") or {}).get("resume_from")
    if not path or not storage_uri:
        return None
    filesystem, _ = Storage(storage_uri).filesystem()
    return tune.Checkpoint(path, filesystem=filesystem)


def run_trial(
    params: dict,
    datasets: dict,
    base: dict,
    cpus: float = 1.0,
    session_uri: str | None = None,
    storage_uri: str | None = None,
) -> None:
    started = time.perf_counter()
    torch.set_num_threads(max(1, int(cpus)))
    session = Storage(session_uri) if session_uri else None
    note = f"{FAILURES}/{tune.get_context().get_trial_id()}.txt"
    if session and (earlier := session.read_text(note)) is not None:  # a diverged trial's retry
        raise TrialDiverged(earlier)
    config, _ = trial_config(params, base)
    data = datasets[data_key(config)]
    previous = tune.get_checkpoint() or _earlier_checkpoint(params, storage_uri)
    with tempfile.TemporaryDirectory(prefix="fer-resume-") as restored:
        start = None
        if previous is not None:
            previous.to_directory(restored)
            if (Path(restored) / RESULTS_FILE).is_file():  # finished before: report it again
                final = json.loads((Path(restored) / RESULTS_FILE).read_text())
                tune.report(final, checkpoint=tune.Checkpoint.from_directory(restored))
                return
            start = Path(restored) / STATE_FILE

        def report(metrics: dict, folder: str | None) -> None:
            checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
            tune.report(metrics, checkpoint=checkpoint)

        asked = (lambda: checkpoint_requested(session)) if session else None
        try:
            result = fit(config, data, report=report, checkpoint=start, checkpoint_now=asked)
        except TrainingDiverged as err:
            if session:
                session.write_text(note, str(err))
            raise TrialDiverged(str(err)) from None

    with tempfile.TemporaryDirectory(prefix="fer-final-") as folder:
        final = final_metrics(result, time.perf_counter() - started)
        final["node_id"] = ray.get_runtime_context().get_node_id()
        write_artifacts(Path(folder), final, result)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(folder))
