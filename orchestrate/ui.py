"""``python -m orchestrate.ui``: MLflow's UI on the store the studies used, and the URL of a
study's runs.

The store is the studies' own default (``MLFLOW_TRACKING_URI`` if set, else
``sqlite:///<cwd>/mlflow.db``, artifacts in ``mlartifacts/`` beside it) or ``--tracking-uri``. The
command prints the URL of the study's runs (``--study``, else the newest study in the store),
then becomes MLflow's server until Ctrl-C. An http(s) store is a server already: the command
prints the URL and exits.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from pathlib import Path

HOST, PORT = "127.0.0.1", 5000


def runs_url(base: str, experiment_id: str | None) -> str:
    """The page of an experiment's runs in MLflow's UI at ``base`` (its home page without one);
    credentials in ``base`` are left out."""
    parts = urllib.parse.urlsplit(base.rstrip("/"))
    base = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
    return f"{base}/#/experiments/{experiment_id}/runs" if experiment_id else f"{base}/"


def ui_base(uri: str, host: str = HOST, port: int = PORT) -> str:
    """Where the UI of a tracking store is: the server itself, or the one this command starts."""
    if uri.startswith(("http://", "https://")):
        return uri
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # every interface: this one
    return f"http://{shown}:{port}"


def study_experiment(uri: str, study: str | None) -> str | None:
    """The experiment id of ``study``, or of the newest study in the store (None: no study)."""
    from mlflow.tracking import MlflowClient

    from orchestrate.store.tracking import PARENT_TAG

    client = MlflowClient(uri)
    if study:
        experiment = client.get_experiment_by_name(study)
        if experiment is None:
            raise ValueError(f"study {study!r} has no experiment in {uri}")
        return experiment.experiment_id
    ids = [e.experiment_id for e in client.search_experiments()]
    newest = (
        client.search_runs(
            ids, f"tags.{PARENT_TAG} = 'true'", order_by=["start_time DESC"], max_results=1
        )
        if ids
        else []
    )
    return newest[0].info.experiment_id if newest else None


def main(argv: list[str] | None = None) -> int:
    from fermodel.cli import OneLineParser

    parser = OneLineParser(
        prog="python -m orchestrate.ui",
        description="Start MLflow's UI on the studies' store and print the URL of a study's runs.",
    )
    parser.add_argument(
        "--study", metavar="NAME", help="the study whose runs to open. Default: the newest one"
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store. Default: MLFLOW_TRACKING_URI if set, else "
        "sqlite:///<cwd>/mlflow.db (as for the studies)",
    )
    parser.add_argument("--host", default=HOST, help=f"the interface to serve on. Default: {HOST}")
    parser.add_argument("--port", type=int, default=PORT, help=f"Default: {PORT}")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    from orchestrate.store.tracking import (
        TrackingError,
        check_reachable,
        default_tracking_uri,
        mask,
    )

    uri = args.tracking_uri or default_tracking_uri()
    server = uri.startswith(("http://", "https://"))
    try:
        if server:
            check_reachable(uri)
        elif uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise ValueError(
                f"no MLflow store at {uri.removeprefix('sqlite:///')}; run a study "
                f"first, or give --tracking-uri"
            )
        url = runs_url(ui_base(uri, args.host, args.port), study_experiment(uri, args.study))
    except (ValueError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if server:
        print(url)
        return 0
    print(f"MLflow UI on {mask(uri)}: open {url} (Ctrl-C stops it)", flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    sys.exit(main())
