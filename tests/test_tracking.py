"""The study's MLflow writer: queued writes, retried through outages, reported; failure reasons.
And a finished study as MLflow users expect it: every trial's selected model logged (and
predicting as the trial did), the best on validation registered, source, commit and dataset on
every run, and the printed URL showing the runs in MLflow's UI (a real browser).

The writer is exercised with plain callables that fail the way MLflow's client fails when its
server is away; the real server outage is in tests/test_cluster.py.
"""

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ARTIFACTS
from mlflow.tracking import MlflowClient

from orchestrate.store.tracking import TrackingError, Writer, failure_reason


class Server:
    """Refuses connections until ``up_at`` (monotonic seconds), then records writes in order."""

    def __init__(self, down_for: float):
        self.up_at = time.monotonic() + down_for
        self.written: list[int] = []
        self.threads: set[str] = set()

    def write(self, i: int) -> None:
        self.threads.add(threading.current_thread().name)
        if time.monotonic() < self.up_at:
            raise ConnectionError(
                "API request to endpoint /api/2.0/mlflow/runs/log-batch failed with exception "
                "HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded "
                "(Caused by NewConnectionError: Connection refused)"
            )
        self.written.append(i)


def test_an_outage_delays_no_caller_loses_nothing_and_is_reported():
    server, writer = Server(down_for=1.5), Writer(budget=30)
    started = time.monotonic()
    for i in range(20):
        writer.submit(f"write {i}", lambda i=i: server.write(i))
    assert time.monotonic() - started < 0.1  # the callers (Tune's loop) never waited
    writer.flush()
    assert server.written == list(range(20))  # all of them, in order
    assert server.threads == {"mlflow-writer"}
    summary = writer.summary()
    assert summary.startswith("MLflow was unreachable 1 time(s), ")
    assert "1 write(s) waited and were retried, none lost" in summary
    assert 1.2 < writer.outages[0] < 5


def test_an_outage_longer_than_the_budget_fails_with_a_clear_message():
    server, writer = Server(down_for=60), Writer(budget=0.6)
    for i in range(3):
        writer.submit(f"write {i}", lambda i=i: server.write(i))
    with pytest.raises(TrackingError, match=r"unreachable for more than 1 s .*gave up at write 0"):
        writer.flush()
    assert server.written == []
    assert len(writer.lost) == 1  # the one it was retrying; the rest were dropped unattempted


def test_a_write_that_can_never_succeed_is_dropped_and_counted_not_retried_forever():
    writer = Writer(budget=30)
    calls = []

    def bad():
        calls.append(1)
        raise ValueError("INVALID_PARAMETER_VALUE: metric value must be finite")

    writer.submit("bad", bad)
    writer.submit("good", lambda: calls.append(2))
    writer.flush()
    assert calls == [1, 1, 1, 2]
    assert "1 write(s) failed and were dropped, first: bad: INVALID_PARAMETER" in writer.summary()


def test_a_synchronous_call_returns_its_value_after_retrying():
    server, writer = Server(down_for=0.8), Writer(budget=30)
    assert writer.call(lambda: server.write(7) or "done") == "done"
    assert server.written == [7] and writer.retried == 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "orchestrate.run.trainable.TrialDiverged: training diverged: non-finite loss at epoch "
            "3, step 12",
            "divergence",
        ),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "out of memory"),
        (
            "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on "
            "memory",
            "out of memory",
        ),
        ("ValueError: backbone 'resnet18' takes attention='none' only", "exception"),
    ],
)
def test_failure_reasons(text, reason):
    assert failure_reason(text) == reason


# ------------------------------------------------------------ a finished study, as MLflow has it


@pytest.fixture
def study(finished_study):
    """The session's finished study (tests/conftest.py): two cells x two seeds, models logged."""
    return finished_study


def _test_split(run):
    """The trial's config and its test split, as the engine made them."""
    from fermodel.config import TrialConfig
    from fermodel.data import make_splits
    from fermodel.engine import load_trial_data

    config = TrialConfig.from_dict(run.data.params)
    data = load_trial_data(config)
    return config, make_splits(
        data, config.protocol, config.fold, config.folds, seed=config.split_seed
    ).test


@pytest.mark.slow
@pytest.mark.xdist_group("finished-study")
def test_each_trial_logs_its_selected_model_which_predicts_as_the_trial(study, monkeypatch):
    import mlflow.pytorch
    from mlflow.models import get_model_info

    from fermodel.predict import selected_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", study.uri)
    for run in study.children:
        uri = f"runs:/{run.info.run_id}/model"
        names = {a.path for a in study.client.list_artifacts(run.info.run_id)}
        assert "best_model.pt" not in names and "predictions.json" in names
        info = get_model_info(uri)
        predictions = json.loads(
            Path(
                study.client.download_artifacts(run.info.run_id, "predictions.json", str(study.tmp))
            ).read_text()
        )
        classes = predictions["classes"]
        assert info.metadata["classes"] == classes
        (inputs,), (outputs,) = info.signature.inputs.inputs, info.signature.outputs.inputs
        assert inputs.shape == (-1, 1, 48, 48) and str(inputs.type) == "float32"
        assert outputs.shape == (-1, len(classes))
        assert info.saved_input_example_info is not None
        config, test = _test_split(run)
        images = test.images.float() / 255
        logits = mlflow.pytorch.load_model(uri)(images)
        # the same weights as the trial's final checkpoint keeps for its selected epoch
        member = run.data.tags["pack_index"]  # its folder in its Tune trial's checkpoint
        (weights,) = (study.tmp / "ray").glob(
            f"*/*{run.data.tags['ray_trial_id']}*/checkpoint_*/{member}/best_model.pt"
        )
        own = selected_model(config, len(classes), torch.load(weights, weights_only=True))
        with torch.inference_mode():
            assert torch.allclose(logits, own(images), atol=1e-4)
        # and the classes the trial predicted on its test images, wherever they are no near-tie
        top2 = logits.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1] > 1e-3).tolist()
        predicted = logits.argmax(1).tolist()
        for mine, theirs, ok in zip(predicted, predictions["predictions"], clear, strict=True):
            assert mine == theirs or not ok


@pytest.mark.slow
@pytest.mark.xdist_group("finished-study")
def test_the_best_trial_on_validation_is_the_registered_model_alias_best(study, monkeypatch):
    import mlflow.pytorch

    assert study.summary["model"] == "models:/minireport@best"
    version = study.client.get_model_version_by_alias("minireport", "best")
    best = min(
        study.children, key=lambda r: (-r.data.metrics["best_val_accuracy"], r.info.start_time)
    )
    assert version.run_id == best.info.run_id
    assert version.tags["session"] == study.summary["session"]
    assert float(version.tags["best_val_accuracy"]) == best.data.metrics["best_val_accuracy"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", study.uri)
    _, test = _test_split(best)
    registered = mlflow.pytorch.load_model("models:/minireport@best")(test.images.float() / 255)
    logged = mlflow.pytorch.load_model(f"runs:/{best.info.run_id}/model")(test.images.float() / 255)
    assert torch.equal(registered, logged)


@pytest.mark.slow
@pytest.mark.xdist_group("finished-study")
def test_every_run_names_its_source_commit_and_dataset(study):
    import subprocess

    from fermodel.data import make_splits
    from fermodel.engine import load_trial_data

    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert len(study.runs) == 5
    digests = set()
    for run in study.runs:
        tags = run.data.tags
        assert tags["mlflow.source.name"] == str(root / "orchestrate" / "ablation.py")
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.git.commit"] == commit
        (used,) = run.inputs.dataset_inputs
        dataset = used.dataset
        assert dataset.name == "synthetic" and len(dataset.digest) == 16
        assert json.loads(dataset.source) == {
            "uri": "synthetic:subjects=5,images_per_class=2,difficulty=1.0,seed=0"
        }
        assert {(t.key, t.value) for t in used.tags} == {("mlflow.data.context", "training")}
        profile = json.loads(dataset.profile)
        config, _ = _test_split(study.children[0])
        splits = make_splits(load_trial_data(config), "official", seed=config.split_seed)
        assert (profile["train"], profile["val"], profile["test"]) == (
            len(splits.train),
            len(splits.val),
            len(splits.test),
        )
        assert "mlflow_tensorspec" in json.loads(dataset.schema)
        digests.add(dataset.digest)
    assert len(digests) == 1  # every trial read the same images
    assert study.experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
@pytest.mark.xdist_group("finished-study")
def test_the_study_ends_with_where_to_look_next(study):
    lines = study.out.rstrip().splitlines()[-3:]
    session = study.summary["session"]
    url = f"http://127.0.0.1:5000/#/experiments/{study.experiment.experiment_id}/runs"
    assert lines[0] == (
        f"next: browse the runs: open {url} (start the UI with: "
        f"python -m orchestrate.ui --tracking-uri {study.uri})"
    )
    report = study.tmp / "reports" / session / "report.html"
    assert lines[1] == f"report: {report}" and report.is_file()
    assert {"report.html", "report.tex", "study_table.md", "study_table.csv", "contrasts.csv"} <= {
        p.name for p in report.parent.iterdir()
    }
    assert lines[2] == "best model: models:/minireport@best"


@pytest.mark.slow
@pytest.mark.xdist_group("finished-study")
def test_the_printed_url_shows_the_study_runs_in_mlflow_ui(study):
    import os
    import signal
    import subprocess
    import sys

    from conftest import chromium, free_port, wait_http
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrate.ui", "--tracking-uri", study.uri, "--port", str(port)],
        cwd=study.tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # the server and its workers, stopped together below
    )
    try:
        first = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/#/experiments/{study.experiment.experiment_id}/runs"
        assert first.strip() == f"MLflow UI on {study.uri}: open {url} (Ctrl-C stops it)"
        wait_http(f"http://127.0.0.1:{port}/", "python -m orchestrate.ui")
        parent = next(r for r in study.runs if r.data.tags["study_parent"] == "true")
        with sync_playwright() as p:
            browser = chromium(p)
            page = browser.new_page(viewport={"width": 1800, "height": 900})
            page.goto(url)
            page.get_by_text("5 matching runs").wait_for(timeout=60_000)
            cell = page.locator("[role=gridcell]", has_text=parent.info.run_name)
            cell.locator("button").first.click()  # the parent's children
            for child in study.children:
                page.get_by_text(child.info.run_name).wait_for(timeout=30_000)
            digest = parent.inputs.dataset_inputs[0].dataset.digest
            assert page.get_by_text(f"synthetic ({digest})").count() == 5
            # the study report as the UI shows it: the parent's report.html, in MLflow's viewer
            experiment = study.experiment.experiment_id
            page.goto(
                f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/"
                f"{parent.info.run_id}/artifacts"
            )
            page.get_by_text("report.html").first.click()
            report = page.frame_locator("iframe").first
            report.locator("thead").first.wait_for(timeout=60_000)
            first = report.locator("table").first  # the cells; the comparisons follow
            headers = first.locator("thead tr").last.locator("th").all_inner_texts()
            assert headers[:3] == ["Cell", "n", "Accuracy (%)"]
            assert report.locator("dl.legend").is_visible()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "mlflow_report.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_ui_command_refuses_a_missing_store_in_one_line(tmp_path, capsys):
    from orchestrate.ui import main, runs_url

    assert main(["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: no MLflow store at {tmp_path / 'none.db'}; run a study first, or give "
        "--tracking-uri\n"
    )
    assert not (tmp_path / "none.db").exists()
    assert (
        runs_url("http://alice:s3cret@mlflow:5000/", "7")
        == "http://mlflow:5000/#/experiments/7/runs"
    )


def test_the_writer_thread_aims_mlflow_at_a_run_without_leaking_it(tmp_path, monkeypatch):
    import mlflow

    from orchestrate.store.tracking import _on_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    inside, seen = threading.Event(), threading.Event()

    def write():
        with _on_run(uri, run_id):
            assert mlflow.active_run().info.run_id == run_id
            inside.set()
            seen.wait(10)
            raise RuntimeError("torch.export failed")  # the model cannot be logged

    errors = []
    thread = threading.Thread(target=lambda: _catch(write, errors), name="mlflow-writer")
    thread.start()
    assert inside.wait(30)
    assert mlflow.active_run() is None  # the active run is the writer thread's alone
    seen.set()
    thread.join(30)
    assert [str(e) for e in errors] == ["torch.export failed"]
    assert client.get_run(run_id).info.status == "FINISHED"  # the trial still finished
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the process's store is as it was


def _catch(call, errors):
    try:
        call()
    except Exception as err:
        errors.append(err)
