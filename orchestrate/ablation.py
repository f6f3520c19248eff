"""``python -m orchestrate.ablation``: run a study on Ray Tune, every trial tracked in MLflow.

With no arguments it runs ``table4`` (Basic, + joint loss, + PSA, + both) on the built-in
synthetic set at the ``cpu`` preset, on a local Ray, logging to ``./mlflow.db``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fermodel.cli import OneLineParser
from fermodel.pretrained import PretrainedError

EXAMPLES = """examples:
  python -m orchestrate.ablation                              # table4, synthetic, cpu preset
  python -m orchestrate.ablation --study table3 --seeds 3 --dry-run
  python -m orchestrate.ablation --study table4 --dataset fer2013 --data /data/fer2013 \\
      --preset paper --pretrained /data/weights --gpus-per-trial 0.25 --cpus-per-trial 2
  python -m orchestrate.ablation --study table3 --dataset ckplus --data /data/CK+ --seeds 3
  python -m orchestrate.ablation --study hpo --num-samples 60 --gpus-per-trial 0.5
  python -m orchestrate.ablation --study my_study.toml --address auto \\
      --storage s3://bucket/ray --tracking-uri http://mlflow.internal:5000
  python -m orchestrate.ablation --study table4 --resume      # continue an interrupted study
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m orchestrate.ablation",
        description="Plan a study's trials (a paper table or a tuning study), run them on Ray Tune "
        "(local or a cluster), log every trial to MLflow and print the study's table.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_argument_group("study (override the study file)")
    s.add_argument(
        "--study",
        default="table4",
        help="table3, table4, table5, hpo, or the path of a .toml study (default table4)",
    )
    s.add_argument(
        "--dataset",
        choices=("synthetic", "fer2013", "ckplus"),
        help="dataset of every trial (default: the study's, synthetic)",
    )
    s.add_argument("--data", help="path of your FER2013 or CK+ copy, e.g. /data/fer2013")
    s.add_argument("--seeds", type=int, help="training seeds per cell, e.g. 3")
    s.add_argument(
        "--preset",
        help="settings preset: cpu (minutes on a laptop; the default on "
        "the synthetic set) or paper (the paper's 200 epochs; the default otherwise)",
    )
    s.add_argument("--epochs", type=int, help="epochs per trial, e.g. 30 (overrides the preset)")
    s.add_argument(
        "--protocol",
        choices=("auto", "official", "kfold", "paper"),
        help="how the data is split: auto (the study's; kfold on CK+, official elsewhere), "
        "official (FER2013's Training/PublicTest/PrivateTest), kfold (subject-independent "
        "folds), paper (the paper's CK+ split: augmented copies split 2:1 per class, subjects "
        "on both sides)",
    )
    s.add_argument(
        "--pretrained",
        metavar="FILE|FOLDER|none",
        help="ImageNet initialisation: torchvision's weights file (resnet50-0676ba61.pth), "
        "torchvision's checkpoint folder (each backbone takes its own file), or none; the "
        "paper preset requires it",
    )
    s.add_argument("--num-samples", type=int, help="trials of a tuning study, e.g. 60")
    r = p.add_argument_group("resources and cluster")
    r.add_argument(
        "--gpus-per-trial",
        type=float,
        help="GPUs per trial, fractions allowed, e.g. 0.25 runs four trials per GPU "
        "(default 1 when the cluster has GPUs, else 0)",
    )
    r.add_argument(
        "--cpus-per-trial",
        type=float,
        default=1.0,
        help="CPUs per trial, also its torch threads (default 1)",
    )
    r.add_argument("--max-concurrent", type=int, help="cap on trials running at once, e.g. 4")
    r.add_argument(
        "--address",
        help="join a running Ray cluster (or set RAY_ADDRESS): auto (the one started on "
        "this machine with ray start) or HOST:6379; default: start a private local Ray and "
        "stop it at the end",
    )
    r.add_argument(
        "--storage",
        default="ray_results",
        help="where checkpoints and Tune's state live: a folder (default ./ray_results; on a "
        "cluster one that every node mounts, e.g. NFS) or a URI such as s3://bucket/prefix "
        "(endpoint from AWS_ENDPOINT_URL); checked before anything starts",
    )
    r.add_argument(
        "--node-timeout",
        type=float,
        default=600.0,
        help="on an autoscaling cluster with no node big enough for one trial yet: seconds "
        "to wait for the autoscaler to start one before giving up (default 600)",
    )
    r.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="retries of a failed trial from its last checkpoint (default 2)",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest interrupted session of this study, dataset and "
        "preset without re-running finished trials",
    )
    t = p.add_argument_group("tracking and output")
    t.add_argument(
        "--tracking-uri",
        help="MLflow store: http://host:5000 for a server (clusters), default "
        "MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db",
    )
    t.add_argument(
        "--mlflow-retry-budget",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="how long MLflow may be unreachable mid-study: writes wait in a queue and are "
        "retried (trials go on meanwhile); past this the study fails (default 1800)",
    )
    t.add_argument(
        "--no-log-checkpoints",
        action="store_true",
        help="do not log each trial's selected model weights as an MLflow artifact",
    )
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="print the planned trials and resources, start nothing",
    )
    t.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # our own output names the store to browse; MLflow would print a link per run
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not args.verbose:  # read when mlflow is first imported
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # the study's writer retries through outages itself (and reports them): MLflow's own
    # retries (7, doubling up to minutes) would only hide how long the server was away
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    from fermodel.config import ConfigError
    from fermodel.data import DatasetError
    from orchestrate.cluster import ClusterError
    from orchestrate.runner import RunOptions, run_study
    from orchestrate.storage import Storage, StorageError
    from orchestrate.tracking import TrackingError, default_tracking_uri
    from search_spaces import StudyError, load_study

    try:
        study = load_study(args.study)
        data = str(Path(args.data).expanduser().resolve()) if args.data else None
        dataset = args.dataset or ("fer2013" if data and study.dataset == "synthetic" else None)
        study = study.with_run(
            dataset=dataset, data_path=data, seeds=args.seeds, protocol=args.protocol
        )
        preset = args.preset or ("cpu" if study.dataset == "synthetic" else "paper")
        if args.preset is None and preset not in study.presets:
            preset = None
        options = RunOptions(
            preset=preset,
            epochs=_positive("--epochs", args.epochs),
            num_samples=_positive("--num-samples", args.num_samples),
            gpus_per_trial=_gpus(args.gpus_per_trial),
            cpus_per_trial=_positive("--cpus-per-trial", args.cpus_per_trial),
            max_concurrent=_positive("--max-concurrent", args.max_concurrent),
            address=args.address,
            storage=Storage.parse(args.storage).uri,
            node_timeout=_positive("--node-timeout", args.node_timeout),
            mlflow_retry_budget=_positive("--mlflow-retry-budget", args.mlflow_retry_budget),
            pretrained=_pretrained(args.pretrained),
            tracking_uri=args.tracking_uri or default_tracking_uri(),
            max_failures=args.max_failures,
            resume=args.resume,
            dry_run=args.dry_run,
            verbose=args.verbose,
            log_checkpoints=not args.no_log_checkpoints,
        )
        run_study(study, options)
    except (StudyError, ConfigError, DatasetError, TrackingError, StorageError, ClusterError,
            PretrainedError, FileNotFoundError, ValueError) as err:  # fmt: skip
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = " ".join(["python -m orchestrate.ablation", *(argv if argv is not None
                                                             else sys.argv[1:])])  # fmt: skip
        again += "" if "--resume" in again.split() else " --resume"
        print(f"interrupted: the study's runs are marked KILLED; finished trials are kept. "
              f"Continue with:\n  {again}", file=sys.stderr)  # fmt: skip
        return 130
    return 0


def _positive(flag: str, value):
    if value is not None and value <= 0:
        raise ValueError(f"{flag} must be positive, got {value}")
    return value


def _pretrained(value: str | None) -> str | None:
    if value is None:
        return None
    if value.lower() == "none":
        return ""
    path = Path(value).expanduser().resolve()
    if not path.exists():
        raise ValueError(f"--pretrained {value}: no such file or folder")
    return str(path)


def _gpus(value: float | None) -> float | None:
    if value is not None and value < 0:
        raise ValueError(f"--gpus-per-trial must not be negative, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
