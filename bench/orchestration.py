"""Orchestration overhead: a study of 8 short real trials on a local Ray cluster, its wall time
against the trials' own time (each trial's wall time inside the trainable, from data to
artifacts, its per-epoch checkpoints included, summed and divided by the concurrency).

    overhead ratio     = study wall time / (sum of trial times / concurrency)
    overhead per trial = (study wall time - sum of trial times / concurrency) * concurrency / trials

The study wall time is ``run_study`` from plan to printed table (data, MLflow store and runs,
scheduling, worker start, object-store transfer, logging, artifacts, the table); Ray's own start
and the study file's validation are printed apart or left out, since a cluster is started once
for many studies.

    .venv/bin/python bench/orchestration.py [--trials 8] [--epochs 20]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
from pathlib import Path

STUDY = """
name = "overhead"
kind = "grid"
[run]
dataset = "synthetic"
seeds = {seeds}
[defaults]
backbone = "resnet18"
attention = "none"
[[cells]]
name = "ce"
loss = "ce"
[[cells]]
name = "island"
loss = "island"
[presets.bench]
epochs = {epochs}
batch_size = 32
synthetic_subjects = 12
synthetic_images_per_class = 2
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="an even number")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import ray

    from orchestrate.runner import RunOptions, run_study
    from search_spaces import load_study

    concurrency = 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "overhead.toml")
        path.write_text(STUDY.format(seeds=args.trials // 2, epochs=args.epochs))
        start = time.perf_counter()
        ray.init(num_cpus=concurrency, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)  # fmt: skip
        ray_start = time.perf_counter() - start
        options = RunOptions(
            preset="bench",
            storage=str(Path(tmp, "ray")),
            tracking_uri=f"sqlite:///{Path(tmp, 'mlflow.db')}",
            cpus_per_trial=1,
            max_concurrent=concurrency,
            log_checkpoints=True,
        )
        study = load_study(path)  # validating the study file is not scheduling
        start, start_ms = time.perf_counter(), time.time() * 1000
        summary = run_study(study, options, out=io.StringIO())
        wall = time.perf_counter() - start
        ray.shutdown()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(options.tracking_uri)
        runs = [client.get_run(r) for r in summary["frame"]["run_id"]]
        first_start = (min(r.info.start_time for r in runs) - start_ms) / 1000
    frame = summary["frame"]
    trial_time = frame["trial_seconds"].sum() if "trial_seconds" in frame else float("nan")
    ideal = trial_time / concurrency
    n = len(frame)
    print(
        f"{n} trials of ResNet-18 ({args.epochs} epochs, tiny synthetic set), {concurrency} at "
        f"a time, 1 CPU each; Ray start {ray_start:.1f} s (not counted)"
    )
    print(f"study wall time          : {wall:7.1f} s")
    print(f"sum of trial times / {concurrency}  : {ideal:7.1f} s")
    print(f"overhead ratio           : {wall / ideal:7.2f}   (target <= 1.15)")
    print(f"overhead per trial       : {(wall - ideal) * concurrency / n:7.2f} s (target <= 2 s)")
    print(
        f"  of which before the first trial starts (data, MLflow store and parent "
        f"run, Tune setup, worker start): {first_start:.1f} s"
    )


if __name__ == "__main__":
    main()
