"""``python -m orchestrate.ablation``: run a study on Ray Tune, every trial tracked in MLflow.

With no arguments it runs ``table4`` (Basic, + joint loss, + PSA, + both) on the built-in
synthetic set at the ``cpu`` preset, on a local Ray, logging to ``./mlflow.db``. Running it
again runs only what is not finished: interrupted trials continue from their checkpoints, and
added seeds, folds or cells train alone. Its exit codes are ``EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from fermodel.cli import OneLineParser
from fermodel.pretrained import PretrainedError

# what job systems (Kubernetes, Slurm, CI) read: a diverged trial or one the scheduler stopped
# early is a result of the study; a trial that failed by an error after its retries is not
EXIT_CODES = """exit codes:
  0    every planned trial ended as a result: finished (now or before), diverged, or stopped
       early by the scheduler
  2    bad input (a study file, a flag, a dataset, an unreachable store), or the study is
       already running (its holder named): nothing was created
  3    the study ran and its report was written, but a trial failed by an error after its
       retries, or no trial finished
  4    --storage is full: the study stopped, its runs closed; free space there and run the
       same command, which continues it
  130  stopped by SIGINT (Ctrl-C); 143 by SIGTERM: the same command continues the study
"""
TRIALS_FAILED = 3
STORAGE_FULL = 4

EXAMPLES = """examples:
  python -m orchestrate.ablation                              # table4, synthetic, cpu preset
  python -m orchestrate.ablation --study table3 --seeds 3 --dry-run
  python -m orchestrate.ablation --study table4 --dataset fer2013 --data /data/fer2013 \\
      --preset paper --pretrained /data/weights --gpus-per-trial 0.25 --cpus-per-trial 2
  python -m orchestrate.ablation --study table3 --dataset ckplus --data /data/CK+ --seeds 3
  python -m orchestrate.ablation --study hpo --num-samples 60 --gpus-per-trial 0.5
  python -m orchestrate.ablation --study my_study.toml --address auto \\
      --storage s3://bucket/ray --tracking-uri http://mlflow.internal:5000
  python -m orchestrate.ablation --study table4 --seeds 3     # add seeds to a finished study
"""


def build_parser() -> argparse.ArgumentParser:
    """Every flag says what it means, what it takes and its default; flags that set a trial
    config key take their meaning from the config's field metadata."""
    p = OneLineParser(
        prog="python -m orchestrate.ablation",
        description="Plan a study's trials (a paper table or a tuning study), run them on Ray Tune "
        "(local or a cluster), log every trial to MLflow and print the study's table.",
        epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _study_arguments(p.add_argument_group("study (override the study file)"))
    _resource_arguments(p.add_argument_group("resources and cluster"))
    _tracking_arguments(p.add_argument_group("tracking and output"))
    return p


def _key(name: str, **overrides) -> str:
    from fermodel.config import describe

    return describe(name, **overrides).replace("%", "%%")  # argparse formats help


def _study_arguments(s) -> None:
    s.add_argument(
        "--study",
        default="table4",
        metavar="NAME|FILE",
        help="the study: a paper table or tuning study of search_spaces/studies, or "
        "the path of your own .toml. Allowed: table3, table4, table5, hpo or a "
        "path. Default: table4",
    )
    s.add_argument(
        "--dataset",
        choices=("synthetic", "fer2013", "ckplus"),
        help=_key("dataset", default="the study's (synthetic; fer2013 when only --data is given)"),
    )
    s.add_argument("--data", metavar="PATH", help=_key("data_path"))
    s.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="training seeds per cell (each seed is a trial). Allowed: >= 1. "
        "Default: the preset's (paper: 3), else the study's (1)",
    )
    s.add_argument(
        "--repetitions",
        type=int,
        metavar="R",
        help="repeated k-fold: the kfold protocol's subject folds drawn R times, "
        "each drawing a full set of trials (ignored by protocols without folds). "
        "Allowed: >= 1. Default: the study's (1: one split, the design the report's "
        "level table finds closest to its 5%%)",
    )
    s.add_argument(
        "--preset",
        metavar="NAME",
        help="settings preset of the study file: cpu (minutes on a laptop) or paper "
        "(the paper's setup, 200 epochs). Allowed: a preset the study defines. "
        "Default: cpu on the synthetic set, paper otherwise",
    )
    s.add_argument("--epochs", type=int, metavar="N", help=_key("epochs", default="the preset's"))
    s.add_argument(
        "--protocol",
        choices=("auto", "official", "kfold", "paper"),
        help=_key(
            "protocol",
            allowed="auto (kfold on CK+, official elsewhere), official, kfold or paper",
            default="the study's (auto)",
        ),
    )
    s.add_argument(
        "--pretrained",
        metavar="FILE|FOLDER|none",
        help=_key(
            "pretrained",
            allowed="torchvision's weights file "
            "(resnet50-0676ba61.pth), torchvision's checkpoint folder (each "
            "backbone takes its own file), or none",
            default="the preset's (paper: required)",
        ),
    )
    s.add_argument(
        "--num-samples",
        type=int,
        metavar="N",
        help="trials of a tuning study. Allowed: >= 1. Default: the study's",
    )


def _resource_arguments(r) -> None:
    r.add_argument(
        "--gpus-per-trial",
        type=float,
        metavar="GPUS",
        help="GPUs per trial; 0.25 runs four trials per GPU. Allowed: >= 0, "
        "fractions included. Default: 1 when the cluster has GPUs, else 0",
    )
    r.add_argument(
        "--pack",
        metavar="K|auto",
        default="auto",
        help="grid trials trained together as one pack on one device, same "
        "architecture, each still its own trial (fermodel.pack). Allowed: >= 1, or "
        "auto (on GPUs: the largest pack that fits and raises throughput, measured "
        "on a GPU node at the start; on CPUs: 1). Default: auto",
    )
    r.add_argument(
        "--cpus-per-trial",
        type=float,
        default=1.0,
        metavar="CPUS",
        help="CPUs per trial, also its torch threads. Allowed: > 0. Default: 1",
    )
    r.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        help="cap on trials running at once. Allowed: >= 1. Default: as many as "
        "fit (a tuning study: a quarter of its trials, so TPE learns from finished "
        "ones)",
    )
    r.add_argument(
        "--address",
        metavar="auto|HOST:PORT",
        help="join a running Ray cluster (or set RAY_ADDRESS). Allowed: auto (the "
        "one started on this machine with ray start) or HOST:6379. Default: start a "
        "private local Ray and stop it at the end",
    )
    r.add_argument(
        "--storage",
        default="ray_results",
        metavar="FOLDER|URI",
        help="where checkpoints and Tune's state live, checked before anything "
        "starts. Allowed: a folder (on a cluster one every node mounts, e.g. "
        "NFS) or a URI such as s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL). "
        "Default: ./ray_results",
    )
    r.add_argument(
        "--node-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="on an autoscaling cluster with no node big enough for one trial yet: "
        "how long to wait for the autoscaler to start one. Allowed: > 0. Default: "
        "600",
    )
    r.add_argument(
        "--max-failures",
        type=int,
        default=2,
        metavar="N",
        help="retries of a failed trial from its last checkpoint. Allowed: >= 0. Default: 2",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="insist on continuing: a tuning study its latest unfinished session (without "
        "it one is continued when its plan is the same); a grid study, which always runs only "
        "what is not finished, refuses to start when none of its trials has run before. "
        "Default: off",
    )
    r.add_argument(
        "--retry-failed",
        action="store_true",
        help="grid studies: also run again the trials whose loss diverged before (a divergence "
        "is deterministic, so they are skipped otherwise; trials that failed otherwise are "
        "always run again). Default: off",
    )


def _tracking_arguments(t) -> None:
    t.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="the MLflow store every run is logged to. Allowed: http://host:5000 "
        "for a server (clusters) or sqlite:///FILE. Default: MLFLOW_TRACKING_URI "
        "if set, else sqlite:///<cwd>/mlflow.db",
    )
    t.add_argument(
        "--mlflow-retry-budget",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="how long MLflow may be unreachable mid-study: writes wait in a queue "
        "and are retried (trials go on meanwhile); past this the study fails. "
        "Allowed: > 0. Default: 1800",
    )
    t.add_argument(
        "--no-log-checkpoints",
        action="store_true",
        help="do not log each trial's selected model to MLflow. Default: logged",
    )
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="print the planned trials and resources, start nothing. Default: run",
    )
    t.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own logs. Default: only the study's progress",
    )


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
    from orchestrate.run.cluster import ClusterError
    from orchestrate.run.full_storage import StorageFull
    from orchestrate.run.runner import RunOptions, run_study
    from orchestrate.store.storage import Storage, StorageError
    from orchestrate.store.tracking import TrackingError, default_tracking_uri
    from search_spaces import StudyError, load_study

    try:
        study = load_study(args.study)
        data = str(Path(args.data).expanduser().resolve()) if args.data else None
        dataset = args.dataset or ("fer2013" if data and study.dataset == "synthetic" else None)
        study = study.with_run(
            dataset=dataset,
            data_path=data,
            seeds=args.seeds,
            protocol=args.protocol,
            repetitions=args.repetitions,
        )
        preset = args.preset or ("cpu" if study.dataset == "synthetic" else "paper")
        if args.preset is None and preset not in study.presets:
            preset = None
        options = RunOptions(
            preset=preset,
            epochs=_positive("--epochs", args.epochs),
            num_samples=_positive("--num-samples", args.num_samples),
            gpus_per_trial=_gpus(args.gpus_per_trial),
            pack=_pack(args.pack),
            cpus_per_trial=_positive("--cpus-per-trial", args.cpus_per_trial),
            max_concurrent=_positive("--max-concurrent", args.max_concurrent),
            address=args.address,
            storage=Storage.parse(args.storage).uri,
            node_timeout=_positive("--node-timeout", args.node_timeout),
            mlflow_retry_budget=_positive("--mlflow-retry-budget", args.mlflow_retry_budget),
            pretrained=_pretrained(args.pretrained),
            tracking_uri=args.tracking_uri or default_tracking_uri(),
            max_failures=_at_least_zero("--max-failures", args.max_failures),
            resume=args.resume,
            retry_failed=args.retry_failed,
            dry_run=args.dry_run,
            verbose=args.verbose,
            log_checkpoints=not args.no_log_checkpoints,
        )
        summary = run_study(study, options)
    except (
        StudyError,
        ConfigError,
        DatasetError,
        TrackingError,
        StorageError,
        ClusterError,
        PretrainedError,
        FileNotFoundError,
        ValueError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StorageFull as err:
        print(f"error: {err} (exit {STORAGE_FULL})", file=sys.stderr)
        return STORAGE_FULL
    except KeyboardInterrupt as err:
        given = argv if argv is not None else sys.argv[1:]
        again = "python -m orchestrate.ablation " + shlex.join(given)  # the same command
        print(
            f"stopped ({err.__class__.__name__ if not str(err) else err}): the open runs are "
            f"marked KILLED; finished trials are kept and unfinished ones continue from their "
            f"checkpoints. Continue with:\n  {again}",
            file=sys.stderr,
        )
        return getattr(err, "exit_code", 130)
    failed, finished = summary.get("failed", 0), summary.get("finished")
    if failed or finished == 0:
        why = (
            f"{failed} trial{'s' if failed != 1 else ''} failed by an error after its retries"
            if failed
            else "no trial finished"
        )
        print(
            f"error: {why} (exit {TRIALS_FAILED}); the report above has every trial's fate",
            file=sys.stderr,
        )
        return TRIALS_FAILED
    return 0


def _pack(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--pack must be a whole number >= 1 or auto, got {value!r}")
    return int(value)


def _positive(flag: str, value):
    if value is not None and value <= 0:
        raise ValueError(f"{flag} must be positive, got {value}")
    return value


def _at_least_zero(flag: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{flag} must not be negative, got {value}")
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
